"""Scale at rest and agent creation.

- idle scale: create N sessions (100,000 by default) and read the server's resident memory
  (VmRSS from /proc) before and after: the difference over N is what an idle session costs.
  Python rarely returns memory to the OS, so a session kept in memory shows up here for sure;
  a session kept only in the database costs nothing resident but its share of caches. Then
  `GET /v1/sessions` (the first page, a large page, and a page deep in the list) is timed.
- agent start: `POST /v1/agents` with a demo driver whose start takes 3 s; the answer must
  come at once (state `starting`), the start running in the background.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.load import Sync, client, crew, split
from bench.report import Row
from bench.server import fresh_server
from bench.stats import summary


@dataclass(frozen=True)
class IdlePlan:
    sessions: int = 100_000
    generators: int = 2
    concurrency: int = 32  # creations in flight per generator
    samples: int = 20
    baseline_sessions: int = 1_000


IDLE_QUICK = IdlePlan(sessions=5_000)


@dataclass(frozen=True)
class Creations:
    base: str
    count: int
    concurrency: int


async def create_worker(share: Creations, sync: Sync) -> int:
    """``count`` sessions created by ``concurrency`` loops; returns how many were created."""
    created = 0
    async with client() as http:
        await sync.ready()
        todo = iter(range(share.count))

        async def loop() -> None:
            nonlocal created
            for _ in todo:
                async with http.post(f"{share.base}/v1/sessions", json={"agent": "assistant"}) as response:
                    if response.status != 201:
                        raise RuntimeError(f"POST /v1/sessions: {response.status} {await response.text()}")
                    await response.read()
                created += 1

        await asyncio.gather(*(loop() for _ in range(share.concurrency)))
    return created


async def _create(base: str, count: int, plan: IdlePlan) -> tuple[int, float]:
    shares = [Creations(base, n, plan.concurrency) for n in split(count, plan.generators)]
    async with crew(create_worker, shares) as workers:
        start = await workers.go()
        created = sum(await workers.results())
    return created, time.monotonic() - start


async def _timed_get(http: aiohttp.ClientSession, url: str, samples: int) -> dict[str, float]:
    timings = []
    for _ in range(samples):
        began = time.perf_counter()
        async with http.get(url) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url}: {response.status}")
        timings.append(time.perf_counter() - began)
    return summary(timings)


async def idle_scale(plan: IdlePlan) -> dict[str, Any]:
    async with fresh_server() as server, client() as http:
        # A first thousand warms what any server grows once (caches, pools, the allocator).
        await _create(server.base, plan.baseline_sessions, plan)
        await asyncio.sleep(0.5)
        before = server.rss_kb()
        created, seconds = await _create(server.base, plan.sessions, plan)
        await asyncio.sleep(1.0)  # let the last writes and their buffers settle
        after = server.rss_kb()
        total = created + plan.baseline_sessions
        url = f"{server.base}/v1/sessions"
        listing = {
            "first_page_100": await _timed_get(http, url, plan.samples),
            "page_1000": await _timed_get(http, f"{url}?limit=1000", plan.samples),
            "deep_page_100": await _timed_get(http, f"{url}?offset={total - 100}&limit=100", plan.samples),
        }
    return {
        "sessions": created, "create_per_s": created / seconds, "rss_before_kb": before, "rss_after_kb": after,
        "bytes_per_session": (after - before) * 1024 / created, "listing": listing,
    }


def idle_rows(results: dict[str, Any]) -> list[Row]:
    listing = results["listing"]
    per = results["bytes_per_session"]
    return [
        Row(f"idle scale: {results['sessions']:,} sessions created",
            f"**{per / 1024:.2f} KB resident per idle session** (RSS {results['rss_before_kb'] / 1024:.0f} → "
            f"{results['rss_after_kb'] / 1024:.0f} MB); created at {results['create_per_s']:,.0f}/s",
            "≤ 10 KB", per <= 10 * 1024),
        Row(f"`GET /v1/sessions` with {results['sessions']:,} sessions",
            f"first page of 100: **p50 {listing['first_page_100']['p50_ms']:.1f} ms**, "
            f"p99 {listing['first_page_100']['p99_ms']:.1f} ms; 1,000: p50 {listing['page_1000']['p50_ms']:.1f} ms; "
            f"last page (offset {results['sessions']:,}): p50 {listing['deep_page_100']['p50_ms']:.1f} ms"),
    ]


# --- agent start ---------------------------------------------------------------------------


async def agent_start(samples: int = 50) -> dict[str, Any]:
    timings = []
    async with fresh_server() as server, client() as http:
        for index in range(samples):
            body = {"name": f"slow{index}", "provider": "demo", "provider_options": {"startup_ms": 3000}}
            began = time.perf_counter()
            async with http.post(f"{server.base}/v1/agents", json=body) as response:
                payload = await response.json()
            timings.append(time.perf_counter() - began)
            if response.status != 201 or payload["state"] != "starting":
                raise RuntimeError(f"POST /v1/agents: {response.status} {payload}")
    return summary(timings)


def agent_rows(results: dict[str, Any]) -> list[Row]:
    return [Row("agent start: `POST /v1/agents` with `startup_ms=3000`",
                f"**p50 {results['p50_ms']:.1f} ms**, p99 {results['p99_ms']:.1f} ms, max {results['max_ms']:.1f} ms "
                f"({results['n']} agents; each answers `starting`, the 3 s start runs in the background)",
                "p50 ≤ 20 ms", results["p50_ms"] <= 20)]
