"""Foundation figures: agent creation, turn throughput, and time to the first event.

- agent start: `POST /v1/agents` latency with `startup_ms=3000` (must not wait for the start);
- throughput: S sessions x T sequential turns on the demo model with latency_ms=0;
- first event: time from `POST .../messages` to the run's first SSE event on an idle server.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp

from bench.server import corral_server
from bench.sse import sse_events


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def agent_start(base: str, samples: int = 20) -> dict[str, Any]:
    timings = []
    async with aiohttp.ClientSession() as http:
        for index in range(samples):
            body = {"name": f"slow{index}", "provider_options": {"startup_ms": 3000}}
            started = time.perf_counter()
            async with http.post(f"{base}/v1/agents", json=body) as response:
                payload = await response.json()
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status == 201 and payload["state"] == "starting", payload
    return {"samples": samples, "p50_ms": statistics.median(timings), "max_ms": max(timings)}


async def _session_turns(http: aiohttp.ClientSession, base: str, turns: int) -> None:
    async with http.post(f"{base}/v1/sessions", json={"agent": "assistant"}) as response:
        session = (await response.json())["id"]
    async with http.get(f"{base}/v1/sessions/{session}/events") as stream:
        events = sse_events(stream)
        for turn in range(turns):
            async with http.post(f"{base}/v1/sessions/{session}/messages", json={"content": f"turn {turn}"}) as r:
                run_id = (await r.json())["run_id"]
            async for event in events:
                if event["run_id"] == run_id and event["type"] == "run.completed":
                    break


async def throughput(base: str, sessions: int = 200, turns: int = 5) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(_session_turns(http, base, turns) for _ in range(sessions)))
        elapsed = time.perf_counter() - started
    return {"sessions": sessions, "turns": turns, "seconds": elapsed, "turns_per_s": sessions * turns / elapsed}


async def first_event(base: str, samples: int = 200) -> dict[str, Any]:
    timings = []
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/sessions", json={"agent": "assistant"}) as response:
            session = (await response.json())["id"]
        async with http.get(f"{base}/v1/sessions/{session}/events") as stream:
            events = sse_events(stream)
            for index in range(samples):
                started = time.perf_counter()
                async with http.post(f"{base}/v1/sessions/{session}/messages", json={"content": f"m{index}"}) as r:
                    run_id = (await r.json())["run_id"]
                first = None
                async for event in events:
                    if event["run_id"] == run_id:
                        if first is None:
                            first = time.perf_counter()
                        if event["type"] == "run.completed":
                            break
                assert first is not None
                timings.append((first - started) * 1000)
    return {"samples": samples, "p50_ms": statistics.median(timings), "p99_ms": _pct(timings, 0.99)}


async def run() -> dict[str, Any]:
    async with corral_server() as base:
        results = {
            "agent_start": await agent_start(base),
            "first_event": await first_event(base),
            "throughput": await throughput(base),
        }
    return results
