"""Latency under load: time to the first event, isolation from hung sessions, SSE fan-out.

- first event: `POST .../messages` to the run's first SSE event on the session's open stream,
  on an idle server (one probe session, one turn at a time), and at 80% load: the turns of a
  paced load offering 80% of the maximum turn rate that the same server just measured (so
  "80%" is of this machine and this build, not a constant), each of them a sample;
- isolation: the p99 turn latency of 100 paced sessions, alone and beside 20 sessions whose
  runs are stuck in a 60 s `wait` tool on the same agent; the ratio is what the hung ones cost;
- fan-out: 1,000 SSE observers on one session that streams tokens; each observer times every
  event against the event's own `ts` (the server's wall clock, the same clock here).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from bench.api import cancel, create_agent, create_session, send, until
from bench.load import Sync, TurnLoad, client, crew, merge_turns, open_session, split, turn, turn_worker
from bench.report import Row
from bench.server import fresh_server
from bench.sse import sse_events, sse_frames
from bench.stats import percentile, summary

# --- first event ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstEventPlan:
    samples: int = 200
    sessions: int = 100  # background sessions
    generators: int = 2
    load_fraction: float = 0.8
    max_warmup_s: float = 2.0
    max_measure_s: float = 5.0
    warmup_s: float = 2.0
    measure_s: float = 10.0


FIRST_EVENT_QUICK = FirstEventPlan(samples=50, max_warmup_s=1.0, max_measure_s=3.0, warmup_s=1.0, measure_s=4.0)


async def _probe(http: aiohttp.ClientSession, base: str, samples: int) -> tuple[list[float], list[float], str]:
    """Sequential turns on one session of the default agent: POST to the first event and to
    `run.started`, in seconds, and the first event's type."""
    session_id, stream = await open_session(http, base, "assistant")
    firsts: list[float] = []
    starts: list[float] = []
    kinds: set[str] = set()
    try:
        for index in range(samples):
            done = await turn(http, base, session_id, stream, f"probe {index}")
            firsts.append(done.first_event - done.started)
            starts.append(done.run_started - done.started)
            kinds.add(done.first_type)
            await asyncio.sleep(0.01)  # one probe at a time, a little apart: it must not be the load
    finally:
        await stream.aclose()
    return firsts, starts, "/".join(sorted(kinds))


async def first_event(plan: FirstEventPlan) -> dict[str, Any]:
    async with fresh_server() as server, client() as http:
        idle, idle_started, first_type = await _probe(http, server.base, plan.samples)

        shares = [TurnLoad(server.base, "assistant", n, plan.max_warmup_s, plan.max_measure_s, seed=i)
                  for i, n in enumerate(split(plan.sessions, plan.generators))]
        async with crew(turn_worker, shares) as workers:
            await workers.go()
            maximum = merge_turns(await workers.results()).turns / plan.max_measure_s

        target = plan.load_fraction * maximum
        interval = plan.sessions / target  # each session's time between turn starts
        shares = [TurnLoad(server.base, "assistant", n, plan.warmup_s, plan.measure_s, interval_s=interval, seed=i)
                  for i, n in enumerate(split(plan.sessions, plan.generators))]
        async with crew(turn_worker, shares) as workers:
            await workers.go()
            background = merge_turns(await workers.results())
    return {
        "first_type": first_type,
        "idle": summary(idle),
        "idle_run_started": summary(idle_started),
        "loaded": summary(background.first_events),
        "loaded_run_started": summary(background.run_starts),
        "max_turns_per_s": maximum,
        "load_target_per_s": target,
        "load_turns_per_s": background.turns / plan.measure_s,
    }


def first_event_rows(results: dict[str, Any]) -> list[Row]:
    idle, loaded = results["idle"], results["loaded"]
    kind = results.get("first_type", "?")
    started = {name: results.get(f"{name}_run_started") for name in ("idle", "loaded")}
    then = {name: f"; to `run.started` p50 {value['p50_ms']:.1f} ms" if value else ""
            for name, value in started.items()}
    return [
        Row("first event after `POST .../messages`, idle",
            f"**p50 {idle['p50_ms']:.1f} ms**, p99 {idle['p99_ms']:.1f} ms (`{kind}`, {idle['n']} samples)"
            f"{then['idle']}",
            "p50 ≤ 10 ms", idle["p50_ms"] <= 10),
        Row("first event at 80% load",
            f"**p50 {loaded['p50_ms']:.1f} ms**, p99 {loaded['p99_ms']:.1f} ms{then['loaded']} ({loaded['n']:,} turns "
            f"of a paced load offering {results['load_target_per_s']:,.0f} turns/s, 80% of the "
            f"{results['max_turns_per_s']:,.0f} measured just before; {results['load_turns_per_s']:,.0f} done)"),
    ]


# --- isolation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IsolationPlan:
    sessions: int = 100
    hung: int = 20
    hang_ms: int = 60_000
    latency_ms: int = 50
    interval_s: float = 2.0  # each normal session starts a turn every 2 s: a moderate load
    generators: int = 2
    warmup_s: float = 2.0
    phase_s: float = 6.0
    cycles: int = 4  # pairs of phases: alone, beside; beside, alone; ...


ISOLATION_QUICK = IsolationPlan(warmup_s=1.0, phase_s=4.0, cycles=1)


async def _hang(http: aiohttp.ClientSession, base: str, agent: str, count: int, hang_ms: int) -> list[str]:
    """``count`` sessions each with a run inside a `wait` tool call of ``hang_ms``; returns the run ids
    once every one of them has reported `tool.started` on its stream."""

    async def one() -> str:
        session_id = await create_session(http, base, agent)
        async with http.get(f"{base}/v1/sessions/{session_id}/events") as stream:
            run_id = str((await send(http, base, session_id, f'/tool wait {{"ms": {hang_ms}}}'))["run_id"])
            async for event in sse_events(stream):
                if event["type"] == "tool.started":
                    return run_id
        raise RuntimeError("the stream ended before the tool started")

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _unhang(http: aiohttp.ClientSession, base: str, run_ids: list[str]) -> int:
    """Hard-cancel the hung runs once their phase is over; returns how many were still running
    (all of them, or the phase outlasted the tool and measured nothing hung)."""
    statuses = await asyncio.gather(*(_status(http, base, run_id) for run_id in run_ids))
    await asyncio.gather(*(cancel(http, base, run_id) for run_id in run_ids))
    return sum(status == "running" for status in statuses)


async def isolation(plan: IsolationPlan) -> dict[str, Any]:
    """One paced load runs throughout while the hung sessions come and go in phases; each turn
    counts for the phase that holds it entirely (start and end), so the two conditions share
    the same server, the same sessions and the same drift, interleaved."""
    phases: list[tuple[str, float, float]] = []
    still_running: list[int] = []
    async with fresh_server() as server, client() as http:
        await create_agent(http, server.base, "iso", latency_ms=plan.latency_ms)
        room = plan.cycles * (2 * plan.phase_s + 10)  # the load's window; the parent ends it earlier
        shares = [TurnLoad(server.base, "iso", n, plan.warmup_s, room, interval_s=plan.interval_s, seed=i)
                  for i, n in enumerate(split(plan.sessions, plan.generators))]
        async with crew(turn_worker, shares) as workers:
            start = await workers.go()
            await asyncio.sleep(max(0.0, start + plan.warmup_s - time.monotonic()))
            hung: list[str] = []
            for name in _abba(plan.cycles):
                if name == "beside" and not hung:
                    hung = await _hang(http, server.base, "iso", plan.hung, plan.hang_ms)
                elif name == "alone" and hung:
                    still_running.append(await _unhang(http, server.base, hung))
                    hung = []
                began = time.monotonic()
                await asyncio.sleep(plan.phase_s)
                phases.append((name, began, time.monotonic()))
            if hung:
                still_running.append(await _unhang(http, server.base, hung))
            workers.sync.value.value = 1
            merged = merge_turns(await workers.results())
    by_phase: dict[str, list[float]] = {"alone": [], "beside": []}
    for started, _, _, ended in merged.spans:
        for name, lo, hi in phases:
            if lo <= started and ended <= hi:
                by_phase[name].append(ended - started)
    alone, beside = summary(by_phase["alone"]), summary(by_phase["beside"])
    return {"sessions": plan.sessions, "hung": plan.hung, "latency_ms": plan.latency_ms,
            "interval_s": plan.interval_s, "phase_s": plan.phase_s, "cycles": plan.cycles,
            "alone": alone, "beside_hung": beside, "ratio": beside["p99_ms"] / alone["p99_ms"],
            "hung_still_running": still_running, "turns_per_s": merged.turns / (phases[-1][2] - phases[0][1])}


def _abba(cycles: int) -> list[str]:
    """alone, beside, beside, alone, ...: each condition comes first as often as the other, so a
    drift of the server over the run (its database grows) does not favour either."""
    pairs = [("alone", "beside") if index % 2 == 0 else ("beside", "alone") for index in range(cycles)]
    return [name for pair in pairs for name in pair]


async def _status(http: aiohttp.ClientSession, base: str, run_id: str) -> str:
    async with http.get(f"{base}/v1/runs/{run_id}") as response:
        return str((await response.json())["status"])


def isolation_rows(results: dict[str, Any]) -> list[Row]:
    alone, beside = results["alone"], results["beside_hung"]
    return [Row(
        f"isolation: p99 turn of {results['sessions']} sessions (L={results['latency_ms']} ms, a turn every "
        f"{results['interval_s']:g} s each), alone vs beside {results['hung']} hung in 60 s tools",
        f"**ratio {results['ratio']:.2f}** (p99 {alone['p99_ms']:.0f} ms alone, {beside['p99_ms']:.0f} ms beside; "
        f"p50 {alone['p50_ms']:.0f} / {beside['p50_ms']:.0f} ms; {alone['n'] + beside['n']:,} turns, "
        f"{results['turns_per_s']:,.0f} turns/s)",
        "≤ 1.2", results["ratio"] <= 1.2)]


# --- fan-out -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FanoutPlan:
    observers: int = 1000
    generators: int = 2
    token_ms: int = 50
    words: int = 20
    drive_s: float = 10.0


FANOUT_QUICK = FanoutPlan(drive_s=4.0)


@dataclass(frozen=True)
class Observers:
    base: str
    session_id: str
    count: int
    within_s: float


@dataclass
class Observed:
    lags: list[float] = field(default_factory=list)
    events: int = 0
    complete: int = 0  # observers that saw every seq from 1 to the last, in order
    last_at: float = 0.0


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def observer_worker(share: Observers, sync: Sync) -> Observed:
    """``count`` observers on one session; each times every event it gets against its ``ts``."""
    out = Observed()
    final = [float("inf")]
    async with client(timeout_s=share.within_s + 120) as http:
        url = f"{share.base}/v1/sessions/{share.session_id}/events"
        responses = await asyncio.gather(*(http.get(url) for _ in range(share.count)))
        seen = [0] * share.count

        async def observe(index: int, response: aiohttp.ClientResponse) -> None:
            in_order = True
            try:
                async for ident, _, data in sse_frames(response):
                    seq = int(ident)
                    out.lags.append(time.time() - _ts(json.loads(data)["ts"]))
                    out.events += 1
                    out.last_at = max(out.last_at, time.monotonic())
                    in_order = in_order and seq == seen[index] + 1
                    seen[index] = seq
                    if seq >= final[0]:
                        break
            except aiohttp.ClientError:
                pass  # closed by the watcher once it had everything
            if in_order and seen[index] >= final[0]:
                out.complete += 1

        async def watch() -> None:
            """Learn the last seq from the parent, then close the streams that already have it."""
            async def told() -> bool:
                return bool(sync.value.value)

            await until(told, every=0.05, within=share.within_s + 60, what="the last seq")
            final[0] = sync.value.value
            while True:
                for index, response in enumerate(responses):
                    if seen[index] >= final[0]:
                        response.close()
                await asyncio.sleep(0.1)

        await sync.ready()
        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(share.within_s + 60):
                await asyncio.gather(*(observe(i, r) for i, r in enumerate(responses)))
        finally:
            watcher.cancel()
            for response in responses:
                response.close()
    return out


async def fanout(plan: FanoutPlan) -> dict[str, Any]:
    async with fresh_server() as server, client() as http:
        await create_agent(http, server.base, "fan", token_ms=plan.token_ms)
        session_id, stream = await open_session(http, server.base, "fan")
        shares = [Observers(server.base, session_id, n, plan.drive_s) for n in split(plan.observers, plan.generators)]
        content = " ".join(f"w{i}" for i in range(plan.words - 1))  # the reply is "echo: " + these
        async with crew(observer_worker, shares) as workers:
            start = await workers.go()
            turns = 0
            while time.monotonic() - start < plan.drive_s:
                await turn(http, server.base, session_id, stream, content)
                turns += 1
            driven = time.monotonic() - start
            async with http.get(f"{server.base}/v1/sessions/{session_id}") as response:
                last_seq = int((await response.json())["last_event_seq"])
            workers.sync.value.value = last_seq
            observed = await workers.results()
        await stream.aclose()
    lags = [lag for part in observed for lag in part.lags]
    delivered = sum(part.events for part in observed)
    span = max(part.last_at for part in observed) - start
    return {
        "observers": plan.observers, "token_ms": plan.token_ms, "turns": turns, "events": last_seq,
        "events_per_s": last_seq / driven, "deliveries": delivered, "deliveries_per_s": delivered / span,
        "delivery_span_s": span, "complete_observers": sum(part.complete for part in observed),
        "lag": summary(lags) if lags else None, "lag_p999_ms": percentile(lags, 0.999) * 1000 if lags else None,
    }


def fanout_rows(results: dict[str, Any]) -> list[Row]:
    lag = results["lag"]
    return [Row(
        f"fan-out: {results['observers']:,} SSE observers on one session streaming tokens "
        f"(token_ms={results['token_ms']})",
        f"**delivery lag p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms**; "
        f"{results['events_per_s']:,.0f} events/s produced, **{results['deliveries_per_s']:,.0f} deliveries/s**; "
        f"{results['complete_observers']:,}/{results['observers']:,} observers got every event in order")]
