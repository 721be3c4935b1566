"""Stopping and crashing: scheduler stop, SIGTERM with runs in flight, kill -9 and recovery.

- scheduler stop: in-process, through the Scheduler service's own API (`run()` as a task, a
  job due in an hour, then cancel the task), beside 500 runs in flight in the same kernel: a
  scheduler asleep until its next job must still stop at once (DESIGN invariant 14);
- SIGTERM: a real server with 500 runs in flight — half inside a 10-minute tool call, which
  only the hard cancel after the shutdown grace can end, half stepping through 2 s tool calls,
  which the soft cancel ends at their next boundary — and 20 SSE observers attached; the time
  from the signal to the process's exit, then the runs' statuses read from its database file;
- recovery: a server is killed with SIGKILL right after accepting 2,000 inputs (one running and
  one queued per session, behind a slow demo model); a new server on the same data directory
  must run every one of them. Lost inputs are counted through the API: each input's text must
  come back in the output of a completed run.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.api import create_agent, create_session, runs, send, until
from bench.load import client
from bench.report import Row
from bench.server import Server, serve
from bench.stats import summary

ACTIVE = ("queued", "running", "waiting")

# --- scheduler stop (in-process) -------------------------------------------------------------


async def scheduler_stop(in_flight: int = 500, samples: int = 20) -> dict[str, Any]:
    from corral.kernel import Kernel, KernelConfig
    from corral.services.scheduler import Scheduler
    from corral.services.schedules import EverySchedule
    from corral.settings import default_agent
    from corral.store import Store

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        store = Store(f"sqlite+aiosqlite:///{directory}/corral.db")
        config = KernelConfig(shutdown_grace_s=1.0, workspace_root=Path(directory) / "workspaces")
        kernel = Kernel(store, config, initial_agents=(default_agent(),))
        scheduler = Scheduler(kernel)
        async with kernel.running():
            await kernel.agents.wait_ready("assistant")
            sessions = []
            for _ in range(in_flight):
                row, _ = await kernel.sessions.create("assistant", None, {})
                sessions.append(row["id"])
                await kernel.submit(row["id"], '/tool wait {"ms": 600000}')

            def running() -> int:
                return sum(kernel.session_view(s)["active_status"] == "running" for s in sessions)

            async def all_running() -> bool:
                return running() == in_flight

            await until(all_running, what="every run running")
            await scheduler.add("local", "assistant", EverySchedule(every_s=3600), "due in an hour")
            timings = []
            for _ in range(samples):
                task = asyncio.create_task(scheduler.run())
                await asyncio.sleep(0.1)  # it loads the jobs, then sleeps toward the one due in an hour
                if task.done():
                    raise RuntimeError(f"the scheduler ended by itself: {task.exception()!r}")
                began = time.perf_counter()
                task.cancel()
                await asyncio.wait([task])
                timings.append(time.perf_counter() - began)
            still = running()
    return {"in_flight": still, **summary(timings)}


# --- SIGTERM ---------------------------------------------------------------------------------


def _grace() -> float:
    from corral.settings import Settings

    configured = os.environ.get("CORRAL_SHUTDOWN_GRACE_S")
    return float(configured) if configured else float(Settings.model_fields["shutdown_grace_s"].default)


def _statuses(database: Path) -> dict[str, int]:
    """Run statuses straight from the stopped server's SQLite file (what it committed)."""
    with sqlite3.connect(database) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())


async def _in_flight(http: aiohttp.ClientSession, server: Server, count: int, observers: int
                     ) -> list[aiohttp.ClientResponse]:
    sem = asyncio.Semaphore(64)

    async def one(index: int) -> str:
        async with sem:
            session_id = await create_session(http, server.base)
            content = '/tool wait {"ms": 600000}' if index % 2 == 0 else "/steps 1000 2000"
            await send(http, server.base, session_id, content)
            return session_id

    session_ids = await asyncio.gather(*(one(index) for index in range(count)))
    streams = [await http.get(f"{server.base}/v1/sessions/{sid}/events") for sid in session_ids[:observers]]

    async def all_running() -> bool:
        return len(await runs(http, server.base, statuses=("running",))) >= count

    await until(all_running, within=60, what=f"{count} runs running")
    return streams


async def sigterm(in_flight: int = 500, observers: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        async with serve(Path(directory)) as server, client() as http:
            streams = await _in_flight(http, server, in_flight, observers)
            seconds = await asyncio.to_thread(server.terminate)
            for stream in streams:
                stream.close()
        statuses = _statuses(Path(directory) / "corral.db")
    return {"in_flight": in_flight, "observers": observers, "seconds": seconds, "grace_s": _grace(),
            "statuses": statuses}


async def stop(in_flight: int = 500) -> dict[str, Any]:
    return {"scheduler": await scheduler_stop(in_flight), "sigterm": await sigterm(in_flight)}


def stop_rows(results: dict[str, Any]) -> list[Row]:
    scheduler, term = results["scheduler"], results["sigterm"]
    limit = term["grace_s"] + 1
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(term["statuses"].items()))
    return [
        Row(f"scheduler stop, a job due in an hour, {scheduler['in_flight']} runs in flight (in-process)",
            f"**p50 {scheduler['p50_ms']:.2f} ms**, max {scheduler['max_ms']:.2f} ms ({scheduler['n']} stops)",
            "≤ 100 ms", scheduler["max_ms"] <= 100),
        Row(f"SIGTERM with {term['in_flight']} runs in flight and {term['observers']} observers",
            f"**exit after {term['seconds']:.2f} s** (shutdown_grace_s={term['grace_s']:g}); runs recorded: {statuses}",
            f"≤ grace + 1 s = {limit:g} s", term["seconds"] <= limit),
    ]


# --- recovery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryPlan:
    sessions: int = 1000
    per_session: int = 2  # the first runs, the rest wait queued behind it
    latency_ms: int = 10_000  # long enough that nothing completes before the kill
    concurrency: int = 64


RECOVERY_QUICK = RecoveryPlan(sessions=200, latency_ms=3_000)


def _iso(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


async def recovery(plan: RecoveryPlan) -> dict[str, Any]:
    sent: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        data_dir = Path(directory)
        async with serve(data_dir) as first, client() as http:
            await create_agent(http, first.base, "slow", latency_ms=plan.latency_ms)
            sem = asyncio.Semaphore(plan.concurrency)

            async def new_session() -> str:
                async with sem:
                    return await create_session(http, first.base, "slow")

            session_ids = await asyncio.gather(*(new_session() for _ in range(plan.sessions)))
            sent = {sid: [] for sid in session_ids}

            async def accept(sid: str, content: str) -> None:
                async with sem:
                    await send(http, first.base, sid, content)  # returns on the 202: the input is durable
                    sent[sid].append(content)

            began = time.monotonic()
            for index in range(plan.per_session):  # every session's first input, then every second one
                await asyncio.gather(*(accept(sid, f"input {n}.{index}") for n, sid in enumerate(session_ids)))
            accepting_s = time.monotonic() - began
            first.kill()
            killed_at = time.time()

        restarted = time.monotonic()
        async with serve(data_dir) as second, client() as http:
            healthy = time.monotonic()

            async def all_done() -> bool:
                return not await runs(http, second.base, statuses=ACTIVE, limit=1)

            await until(all_done, within=600, what="every input done")
            done = time.monotonic()
            every_run = [run for sid in sent for run in await runs(http, second.base, session_id=sid)]

    outputs = Counter(line.removeprefix("echo: ") for run in every_run if run["status"] == "completed"
                      for line in (run["output"] or "").splitlines())
    accepted = [content for contents in sent.values() for content in contents]
    before_kill = sum(1 for run in every_run
                      if run["status"] == "completed" and (_iso(run["ended_at"]) or 0) < killed_at)
    return {
        "accepted": len(accepted), "sessions": plan.sessions, "latency_ms": plan.latency_ms,
        "accepting_s": accepting_s, "completed_before_kill": before_kill,
        "restart_to_healthy_s": healthy - restarted, "restart_to_done_s": done - restarted,
        "floor_s": plan.per_session * plan.latency_ms / 1000,
        "lost": sum(1 for content in accepted if outputs[content] == 0),
        "duplicated": sum(1 for content in accepted if outputs[content] > 1),
        "runs_by_status": dict(Counter(run["status"] for run in every_run)),
    }


def recovery_rows(results: dict[str, Any]) -> list[Row]:
    pending = results["accepted"] - results["completed_before_kill"]
    return [Row(
        f"recovery: kill -9 with {results['accepted']:,} accepted inputs ({pending:,} not yet done), restart",
        f"**{results['lost']} lost**, {results['duplicated']} run twice; all done {results['restart_to_done_s']:.1f} s "
        f"after the restart (healthy after {results['restart_to_healthy_s']:.1f} s; the model alone needs "
        f"{results['floor_s']:g} s: {results['sessions']:,} sessions x {results['accepted'] // results['sessions']} "
        f"turns of {results['latency_ms'] / 1000:g} s)",
        "0 lost", results["lost"] == 0)]
