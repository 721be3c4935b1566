"""Throughput: turns/s of S sessions on a demo model with latency L and provider limit P,
beside the HTTP stack's own ceiling (a no-op endpoint driven by the same generator).

A turn is what a client of the API does: `POST .../messages`, then wait on the session's
open SSE stream for the run's terminal event. Sessions run their turns back to back for a
warm-up and a measured window, and only turns that end inside the window count, so the figure
is the steady rate, free of the ramp-up and of the stragglers at the end.

The no-op ceiling is `GET /healthz` on the same server: a route that reads one attribute,
through the same uvicorn, middleware and FastAPI routing a turn's requests take. Its rate is
the most requests a second this server process can answer at all; the generator's and the
server's CPU over the window show which side was saturated.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.api import create_agent
from bench.load import NoopLoad, TurnLoad, crew, merge_turns, noop_worker, split, turn_worker
from bench.report import Row
from bench.server import Server, fresh_server
from bench.stats import median, summary


@dataclass(frozen=True)
class Plan:
    generators: int = 2
    warmup_s: float = 2.0
    measure_s: float = 8.0
    repeats: int = 3
    # (latency_ms L, sessions S, provider limit P)
    configs: tuple[tuple[int, int, int], ...] = ((0, 100, 100), (50, 100, 100), (200, 100, 100), (50, 200, 50))
    noop_connections: int = 100


QUICK = Plan(warmup_s=1.0, measure_s=3.0, repeats=1, configs=((0, 100, 100), (50, 100, 100), (200, 100, 100)))


async def _server_cpu(server: Server, warmup_s: float, measure_s: float) -> float:
    """The server's CPU use (cores) over the measured window, read while the load runs."""
    await asyncio.sleep(warmup_s)
    before = server.cpu_seconds()
    await asyncio.sleep(measure_s)
    return (server.cpu_seconds() - before) / measure_s


async def noop_rate(server: Server, generators: int, plan: Plan) -> dict[str, Any]:
    shares = [NoopLoad(server.base, n, plan.warmup_s, plan.measure_s) for n in split(plan.noop_connections,
                                                                                      generators)]
    async with crew(noop_worker, shares) as workers:
        await workers.go()
        server_cpu = await _server_cpu(server, plan.warmup_s, plan.measure_s)
        results = await workers.results()
    return {
        "generators": len(shares),
        "requests_per_s": sum(r["requests"] for r in results) / plan.measure_s,
        "generator_cpu": [r["cpu_s"] / plan.measure_s for r in results],
        "server_cpu": server_cpu,
    }


async def noop(plan: Plan) -> dict[str, Any]:
    """The ceiling with one generator process and with ``plan.generators``: if adding a process
    does not raise the rate and the server sits at a full core, the server is the limit."""
    by_generators: dict[str, Any] = {}
    async with fresh_server() as server:
        for generators in sorted({1, plan.generators}):
            samples = [await noop_rate(server, generators, plan) for _ in range(plan.repeats)]
            rates = [s["requests_per_s"] for s in samples]
            by_generators[str(generators)] = {"median_requests_per_s": median(rates), "runs": samples}
    best = max(by_generators.values(), key=lambda entry: entry["median_requests_per_s"])
    return {"path": "/healthz", "connections": plan.noop_connections, "requests_per_s":
            best["median_requests_per_s"], "by_generators": by_generators}


async def one_config(latency_ms: int, sessions: int, limit: int, plan: Plan) -> dict[str, Any]:
    async with fresh_server() as server:
        async with aiohttp.ClientSession() as http:
            agent = f"l{latency_ms}p{limit}"
            await create_agent(http, server.base, agent, latency_ms=latency_ms, max_concurrent_calls=limit)
        shares = [TurnLoad(server.base, agent, n, plan.warmup_s, plan.measure_s, seed=index)
                  for index, n in enumerate(split(sessions, plan.generators))]
        async with crew(turn_worker, shares) as workers:
            await workers.go()
            server_cpu = await _server_cpu(server, plan.warmup_s, plan.measure_s)
            merged = merge_turns(await workers.results())
    return {"turns_per_s": merged.turns / plan.measure_s, "turns": merged.turns, "server_cpu": server_cpu,
            "generator_cpu": merged.cpu_s / plan.measure_s, "latencies": merged.latencies}


async def run(plan: Plan) -> dict[str, Any]:
    ceiling = await noop(plan)
    configs = []
    for latency_ms, sessions, limit in plan.configs:
        runs = [await one_config(latency_ms, sessions, limit, plan) for _ in range(plan.repeats)]
        rate = median(r["turns_per_s"] for r in runs)
        ideal = min(sessions, limit) / (latency_ms / 1000) if latency_ms else None
        configs.append({
            "latency_ms": latency_ms, "sessions": sessions, "limit": limit, "turns_per_s": rate,
            "runs_turns_per_s": [r["turns_per_s"] for r in runs], "turns": sum(r["turns"] for r in runs),
            "ideal_turns_per_s": ideal, "of_ideal": rate / ideal if ideal else None,
            "of_noop": rate / ceiling["requests_per_s"],
            "server_cpu": median(r["server_cpu"] for r in runs),
            "generator_cpu": median(r["generator_cpu"] for r in runs),
            "latency": summary([x for r in runs for x in r["latencies"]]),
        })
    return {"generators": plan.generators, "warmup_s": plan.warmup_s, "measure_s": plan.measure_s,
            "repeats": plan.repeats, "noop": ceiling, "configs": configs}


TARGET_OF_IDEAL = {200: 0.95, 50: 0.75}
TARGET_L0_TURNS = 1500
TARGET_L0_OF_NOOP = 0.25


def rows(results: dict[str, Any]) -> list[Row]:
    ceiling = results["noop"]
    by_gen = ceiling["by_generators"]
    proof = "; ".join(
        f"{g} generator process{'es' if g != '1' else ''}: {e['median_requests_per_s']:,.0f}/s "
        f"(server CPU {median(r['server_cpu'] for r in e['runs']):.2f} cores, each generator "
        f"{max(max(r['generator_cpu']) for r in e['runs']):.2f})" for g, e in by_gen.items())
    out = [Row(f"no-op ceiling: `GET /healthz`, {ceiling['connections']} connections",
               f"**{ceiling['requests_per_s']:,.0f} req/s** — {proof}")]
    for config in results["configs"]:
        latency, sessions, limit = config["latency_ms"], config["sessions"], config["limit"]
        name = f"throughput: L={latency} ms, S={sessions}, P={limit}"
        ideal = config["ideal_turns_per_s"]
        of_ideal = "" if ideal is None else f"; {config['of_ideal']:.0%} of the ideal {ideal:,.0f}"
        text = (f"**{config['turns_per_s']:,.0f} turns/s** ({config['of_noop']:.0%} of no-op{of_ideal}); "
                f"turn p50 {config['latency']['p50_ms']:.0f} ms, p99 {config['latency']['p99_ms']:.0f} ms; "
                f"server CPU {config['server_cpu']:.2f}")
        target, met = "", None
        if latency in TARGET_OF_IDEAL and sessions == limit == 100:
            target = f"≥ {TARGET_OF_IDEAL[latency]:.0%} of ideal"
            met = config["of_ideal"] >= TARGET_OF_IDEAL[latency]
        elif latency == 0 and sessions == limit == 100:
            target = f"≥ {TARGET_L0_TURNS:,} turns/s and ≥ {TARGET_L0_OF_NOOP:.0%} of no-op"
            met = config["turns_per_s"] >= TARGET_L0_TURNS and config["of_noop"] >= TARGET_L0_OF_NOOP
        out.append(Row(name, text, target, met))
    return out
