"""Time to first token in `corral chat`: what a person at the terminal waits for.

A real `corral serve` and a real `corral chat` on a pseudo-terminal (pexpect): each sample
types `hello` and Enter, and the clock stops when the first byte of the streamed `echo:`
reaches the terminal. That covers the client's stdin handling, the POST, the run's start,
the demo model's first delta, the SSE hop and the client's rendering.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import pexpect

from bench.server import corral_server

EXPECT_S = 10.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _measure(base: str, samples: int) -> dict[str, Any]:
    """Blocking (pexpect); run in a thread so the event loop stays free."""
    started = time.perf_counter()
    child = pexpect.spawn(sys.executable, ["-m", "corral", "chat", "--url", base], encoding="utf-8",
                          timeout=EXPECT_S, dimensions=(50, 200))
    child.delaybeforesend = None  # pexpect's default 50 ms pause before each send would be measured
    try:
        child.expect_exact("queue> ")
        startup_ms = (time.perf_counter() - started) * 1000
        timings: list[float] = []
        for _ in range(samples):
            sent = time.perf_counter()
            child.send("hello\r")
            child.expect_exact("echo:")
            timings.append((time.perf_counter() - sent) * 1000)
            child.expect_exact("queue> ")  # the answer is complete; the next sample starts clean
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return {
        "samples": samples,
        "startup_ms": startup_ms,
        "p50_ms": statistics.median(timings),
        "p90_ms": _pct(timings, 0.9),
        "max_ms": max(timings),
    }


async def run(samples: int = 20) -> dict[str, Any]:
    async with corral_server() as base:
        return {"chat_ttft": await asyncio.to_thread(_measure, base, samples)}
