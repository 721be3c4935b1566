"""The side-by-side: LangGraph's dev server and Corral, same machine, same workload, one run.

Workload: 100 clients at once, each on its own thread (LangGraph) or session (Corral), each
running R runs back to back; a run is one 50 ms wait and nothing else — LangGraph: a graph
whose only node sleeps 50 ms (bench/peer/graph.py); Corral: the demo model with
`latency_ms=50` and no tokens. Reported: runs/s over the whole batch, and creation to the first
event: LangGraph's `POST /threads/{id}/runs/stream` to its first SSE event (and to the first
`values` event, the graph running), Corral's `POST .../messages` to the run's first event on
the session's open stream (`run.queued`, its record; then `run.started`). Both servers are
driven by the same generator.

The peer runs from its own venv (bench/.peer-venv, from bench/requirements-peer.txt), created
on first use; if it cannot be installed or started, the result says why instead of failing
the whole run. Its concurrency, `--n-jobs-per-worker`, is swept and the best is used.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.api import create_agent
from bench.load import Sync, client, crew, open_session, split, turn
from bench.report import Row
from bench.server import free_port, fresh_server, wait_answering
from bench.stats import median, summary

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-peer.txt"
VENV = HERE / ".peer-venv"
GRAPH_DIR = HERE / "peer"
INSTALL_TIMEOUT_S = 900


class PeerUnavailable(Exception):
    """The peer could not be installed or started here; the message says why."""


@dataclass(frozen=True)
class Plan:
    clients: int = 100
    runs_per_client: int = 10
    generators: int = 2
    jobs_per_worker: tuple[int, ...] = (10, 100, 500)
    sweep_runs_per_client: int = 2  # enough to rank the settings; 10 would take 100 s at 10 jobs
    repeats: int = 3


QUICK = Plan(runs_per_client=3, jobs_per_worker=(100,), sweep_runs_per_client=3, repeats=1)


# --- the peer's venv and server ------------------------------------------------------------


def ensure_venv() -> Path:
    """The `langgraph` command of the peer venv, installing it first if the requirements changed."""
    langgraph = VENV / "bin" / "langgraph"
    stamp = VENV / "requirements.txt"
    wanted = REQUIREMENTS.read_text()
    if langgraph.exists() and stamp.exists() and stamp.read_text() == wanted:
        return langgraph
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)]]
    for command in steps:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"`{' '.join(command)}` did not run: {exc}") from exc
        if done.returncode != 0:
            errors = [line for line in (done.stderr or done.stdout).splitlines() if "WARNING: Location" not in line]
            raise PeerUnavailable(f"`{' '.join(command[:3])} ...` failed: " + " ".join(errors[-5:]))
    if not langgraph.exists():
        raise PeerUnavailable("the peer venv has no `langgraph` command after the install")
    stamp.write_text(wanted)
    return langgraph


@asynccontextmanager
async def langgraph_server(langgraph: Path, jobs_per_worker: int) -> AsyncIterator[str]:
    """`langgraph dev` on a fresh copy of the graph (its in-memory state is saved in the working
    directory, so a copy keeps every server's state fresh); yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="corral-peer-") as directory:
        for name in ("graph.py", "langgraph.json"):
            shutil.copy(GRAPH_DIR / name, directory)
        port = free_port()
        command = [str(langgraph), "dev", "--no-browser", "--no-reload", "--port", str(port),
                   "--n-jobs-per-worker", str(jobs_per_worker), "--server-log-level", "WARNING",
                   "--config", "langgraph.json"]
        env = {**os.environ, "LANGSMITH_TRACING": "false", "LANGGRAPH_CLI_NO_ANALYTICS": "1",
               "PYTHONPATH": ""}
        log_path = Path(directory) / "server.log"
        process = _spawn(command, directory, env, log_path)
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_ok(base, process, log_path)
            yield base
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # our own group: the CLI and its server
                try:
                    await asyncio.to_thread(process.wait, 20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _spawn(command: list[str], cwd: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start the peer in a process group of its own, output to a log (sync: it only forks)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True)


def _tail(path: Path, lines: int = 5) -> str:
    return " ".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _wait_ok(base: str, process: subprocess.Popen[bytes], log_path: Path, within: float = 90.0) -> None:
    await wait_answering(f"{base}/ok", process, within=within, poll_s=0.2,
                         fail=lambda why: PeerUnavailable(f"`langgraph dev` {why}: {_tail(log_path)}"))


# --- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Clients:
    kind: str  # "langgraph" or "corral"
    base: str
    count: int
    runs: int


@dataclass
class RunSamples:
    first_event: list[float] = field(default_factory=list)
    first_types: Counter[str] = field(default_factory=Counter)
    started: list[float] = field(default_factory=list)  # LangGraph: the first `values`; Corral: `run.started`
    ended: list[float] = field(default_factory=list)
    last_end: float = 0.0


async def _langgraph_client(http: aiohttp.ClientSession, base: str, runs: int, thread: str, out: RunSamples) -> None:
    for index in range(runs):
        body = {"assistant_id": "sleeper", "input": {"content": f"run {index}"}, "stream_mode": ["values"]}
        began = time.monotonic()
        first = values = None
        async with http.post(f"{base}/threads/{thread}/runs/stream", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"runs/stream: {response.status} {await response.text()}")
            event = None
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif not line and event is not None:
                    now = time.monotonic()
                    if first is None:
                        first = now
                        out.first_types[event] += 1
                    if event == "values" and values is None:
                        values = now
                    if event == "error":
                        raise RuntimeError("the peer's run failed")
                    event = None
        ended = time.monotonic()
        if first is None or values is None:
            raise RuntimeError("the peer's stream ended without events")
        out.first_event.append(first - began)
        out.started.append(values - began)
        out.ended.append(ended - began)
        out.last_end = max(out.last_end, ended)


async def clients_worker(share: Clients, sync: Sync) -> tuple[float, RunSamples]:
    """``count`` clients, each with its own thread/session, each doing ``runs`` runs in turn."""
    out = RunSamples()
    async with client() as http:
        if share.kind == "langgraph":
            threads = []
            for _ in range(share.count):
                async with http.post(f"{share.base}/threads", json={}) as response:
                    threads.append(str((await response.json())["thread_id"]))
            start = await sync.ready()
            await asyncio.gather(*(_langgraph_client(http, share.base, share.runs, t, out) for t in threads))
        else:
            opened = await asyncio.gather(*(open_session(http, share.base, "peer50") for _ in range(share.count)))

            async def corral_client(session_id: str, stream: Any) -> None:
                for index in range(share.runs):
                    done = await turn(http, share.base, session_id, stream, f"run {index}")
                    out.first_event.append(done.first_event - done.started)
                    out.first_types[done.first_type] += 1
                    out.started.append(done.run_started - done.started)
                    out.ended.append(done.ended - done.started)
                    out.last_end = max(out.last_end, done.ended)

            start = await sync.ready()
            try:
                await asyncio.gather(*(corral_client(sid, stream) for sid, stream in opened))
            finally:
                for _, stream in opened:
                    await stream.aclose()
    return start, out


async def _batch(kind: str, base: str, plan: Plan) -> dict[str, Any]:
    shares = [Clients(kind, base, n, plan.runs_per_client) for n in split(plan.clients, plan.generators)]
    async with crew(clients_worker, shares) as workers:
        await workers.go()
        parts = await workers.results()
    start = min(s for s, _ in parts)
    samples = [p for _, p in parts]
    total = sum(len(p.ended) for p in samples)
    return {
        "runs": total, "runs_per_s": total / (max(p.last_end for p in samples) - start),
        "first_types": dict(sum((p.first_types for p in samples), Counter[str]())),
        "first_event": [x for p in samples for x in p.first_event],
        "started": [x for p in samples for x in p.started],
        "ended": [x for p in samples for x in p.ended],
    }


def _summarise(batches: list[dict[str, Any]]) -> dict[str, Any]:
    first_types = sum((Counter(b["first_types"]) for b in batches), Counter[str]())
    return {
        "first_type": first_types.most_common(1)[0][0],
        "runs_per_s": median(b["runs_per_s"] for b in batches),
        "runs_per_s_each": [b["runs_per_s"] for b in batches],
        "first_event": summary([x for b in batches for x in b["first_event"]]),
        "started": summary([x for b in batches for x in b["started"]]),
        "ended": summary([x for b in batches for x in b["ended"]]),
    }


async def run_corral(plan: Plan) -> dict[str, Any]:
    batches = []
    for _ in range(plan.repeats):
        async with fresh_server() as server, client() as http:
            await create_agent(http, server.base, "peer50", latency_ms=50)
            batches.append(await _batch("corral", server.base, plan))
    return _summarise(batches)


async def run_langgraph(plan: Plan) -> dict[str, Any]:
    langgraph = await asyncio.to_thread(ensure_venv)
    sweep: dict[str, dict[str, Any]] = {}
    short = replace(plan, runs_per_client=plan.sweep_runs_per_client)
    for jobs in plan.jobs_per_worker:
        async with langgraph_server(langgraph, jobs) as base:
            sweep[str(jobs)] = await _batch("langgraph", base, short)
    best = max(sweep, key=lambda jobs: sweep[jobs]["runs_per_s"])
    batches = [sweep[best]] if short == plan else []
    while len(batches) < plan.repeats:
        async with langgraph_server(langgraph, int(best)) as base:
            batches.append(await _batch("langgraph", base, plan))
    return {"jobs_per_worker": int(best), "sweep_runs_per_s": {j: b["runs_per_s"] for j, b in sweep.items()},
            **_summarise(batches)}


async def run(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"clients": plan.clients, "runs_per_client": plan.runs_per_client,
                               "repeats": plan.repeats, "corral": await run_corral(plan)}
    try:
        results["langgraph"] = await run_langgraph(plan)
    except PeerUnavailable as exc:
        results["langgraph"] = {"unavailable": str(exc)}
    except RuntimeError as exc:  # it started but failed under the workload: say so, keep the run
        results["langgraph"] = {"unavailable": f"it failed under the workload: {str(exc)[-300:]}"}
    return results


def rows(results: dict[str, Any]) -> list[Row]:
    corral, peer = results["corral"], results["langgraph"]
    workload = (f"{results['clients']} concurrent clients x {results['runs_per_client']} runs of a 50 ms step, "
                f"one thread/session each")
    out = [Row(f"Corral (demo model, latency_ms=50): {workload}",
               f"**{corral['runs_per_s']:,.0f} runs/s**; creation to first event (`{corral.get('first_type', '?')}`) "
               f"**p50 {corral['first_event']['p50_ms']:.1f} ms**, p99 {corral['first_event']['p99_ms']:.1f} ms; "
               f"to `run.started` p50 {corral['started']['p50_ms']:.0f} ms; "
               f"to the run's end p50 {corral['ended']['p50_ms']:.0f} ms")]
    if "unavailable" in peer:
        out.append(Row("LangGraph dev server", f"not measured: {peer['unavailable']}"))
        return out
    sweep = ", ".join(f"{jobs}: {rate:,.0f}" for jobs, rate in peer["sweep_runs_per_s"].items())
    out.append(Row(
        f"LangGraph dev server, `--n-jobs-per-worker {peer['jobs_per_worker']}` (the best of a sweep, runs/s by "
        f"setting: {sweep}): same workload",
        f"**{peer['runs_per_s']:,.0f} runs/s**; creation to first event (`{peer.get('first_type', '?')}`) "
        f"**p50 {peer['first_event']['p50_ms']:.1f} ms**, p99 {peer['first_event']['p99_ms']:.1f} ms; to the first "
        f"`values` event p50 {peer['started']['p50_ms']:.0f} ms, p99 {peer['started']['p99_ms']:.0f} ms; "
        f"to the run's end p50 {peer['ended']['p50_ms']:.0f} ms"))
    return out


def markdown(results: dict[str, Any]) -> str:
    """The side-by-side as one comparison table (the doc's peer block)."""
    corral, peer = results["corral"], results["langgraph"]
    lines = ["| server | setting | runs/s | creation to first event p50 / p99 | to the run running p50 | "
             "to the run's end p50 / p99 |", "| --- | --- | --- | --- | --- | --- |"]

    def line(name: str, setting: str, data: dict[str, Any], running: str) -> str:
        return (f"| {name} | {setting} | **{data['runs_per_s']:,.0f}** | **{data['first_event']['p50_ms']:,.0f}** / "
                f"{data['first_event']['p99_ms']:,.0f} ms (`{data.get('first_type', '?')}`) | "
                f"{data['started']['p50_ms']:,.0f} ms ({running}) | "
                f"{data['ended']['p50_ms']:,.0f} / {data['ended']['p99_ms']:,.0f} ms |")

    lines.append(line("Corral", "demo model, `latency_ms=50`", corral, "`run.started`"))
    if "unavailable" in peer:
        lines.append(f"| LangGraph dev server | — | not measured: {peer['unavailable']} | | | |")
    else:
        sweep = ", ".join(f"{jobs}: {rate:,.0f}" for jobs, rate in peer["sweep_runs_per_s"].items())
        lines.append(line("LangGraph dev server", f"`--n-jobs-per-worker {peer['jobs_per_worker']}` (sweep, runs/s: "
                          f"{sweep})", peer, "first `values`"))
    workload = (f"{results['clients']} clients at once, {results['runs_per_client']} runs each, "
                f"median of {results['repeats']} batches")
    return workload + ":\n\n" + "\n".join(lines)
