"""Observers and streams at scale (issue 17): a stalled or numerous audience, and a stream per turn.

- audience (`python -m bench audience`): one session streams replies (the demo model at
  `token_ms` 0.2, 200 words a reply) turn after turn while 20 other sessions each do a turn
  every 0.5 s, for the whole run, on one server. Phases come and go around them: nobody else
  watching the streaming session; 200 observers that connect and never read a byte (raw
  sockets, the kernel's default receive buffer); 1,000 SSE readers (two generator processes);
  both kinds attach at the session's current end (`Last-Event-ID`), as a page that has just
  read the session does;
  nobody again (so drift shows). Each phase is timed after its observers are attached and
  reports the session's delta rate, the other sessions' turn latency (each turn counts for
  the phase that holds it entirely), the server's CPU, its resident memory before, during
  and after the observers (they leave, 1 s passes), `corral_observer_catch_ups`, and for the
  readers every frame they got (deliveries/s, and server CPU per delivery). The kernel's TCP
  memory (`/proc/net/sockstat`, machine-wide) shows what socket buffers hold.
- per-turn (`python -m bench per-turn`): 100 clients at once, each on its own session, each
  doing 10 turns back to back on a demo agent with `latency_ms` 50, in three ways: the
  session's stream kept open (the throughput scenarios' turn); `POST .../messages` then
  `GET /v1/runs/{id}/events` followed to its end (what docs/api.md shows a client); and one
  request, `POST .../messages` with `Accept: text/event-stream`. Each way runs on fresh servers,
  interleaved, median of 3 batches; then LangGraph's dev server on the same workload
  (bench/peer.py: `POST /threads/{id}/runs/stream`, its concurrency swept).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import peer
from bench.api import create_agent, create_session, until
from bench.load import (
    TERMINAL,
    Sync,
    TurnLoad,
    client,
    crew,
    merge_turns,
    open_session,
    split,
    turn,
    turn_worker,
)
from bench.report import Row
from bench.server import fresh_server
from bench.sse import sse_frames
from bench.stats import median, summary

# --- audience ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudiencePlan:
    stalled: int = 200
    readers: int = 1000
    words: int = 200  # deltas per streamed reply
    token_ms: float = 0.2
    background_sessions: int = 20
    background_interval_s: float = 0.5
    settle_s: float = 2.0  # after observers attach, before the window; and after they leave
    measure_s: float = 8.0
    generators: int = 2


AUDIENCE_QUICK = AudiencePlan(stalled=50, readers=200, measure_s=3.0)
PHASES = ("none", "stalled", "readers", "none again")


@dataclass(frozen=True)
class Readers:
    base: str
    session_id: str
    count: int


@dataclass
class ReaderCounts:
    """Frames received by a reader process, per 100 ms of the monotonic clock (shared by every
    process on Linux), so the parent can count those inside a phase's window."""

    buckets: Counter[int] = field(default_factory=Counter)
    attached: int = 0
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, process CPU) samples


BUCKET_S = 0.1
OPEN, CLOSE = 1.0, 2.0


async def reader_worker(share: Readers, sync: Sync) -> ReaderCounts:
    """``count`` SSE readers of one session, opened when the parent says so (``sync.value`` 1)
    and closed when it says so (2). A reader only counts frames (each begins with ``id:``):
    parsing nothing keeps the generator's CPU low."""
    out = ReaderCounts()
    await sync.ready()

    async def told(value: float) -> bool:
        return bool(sync.value.value >= value)

    await until(lambda: told(OPEN), every=0.02, within=600, what="the order to attach")
    url = f"{share.base}/v1/sessions/{share.session_id}/events"
    async with client(timeout_s=900) as http:
        # From the session's current end, as a dashboard that just read the session attaches.
        async with http.get(f"{share.base}/v1/sessions/{share.session_id}") as response:
            tail = {"last-event-id": str((await response.json())["last_event_seq"])}
        responses = await asyncio.gather(*(http.get(url, headers=tail) for _ in range(share.count)))
        out.attached = sum(r.status == 200 for r in responses)

        async def read(response: aiohttp.ClientResponse) -> None:
            tail = b"\n"
            try:
                async for chunk in response.content.iter_any():
                    joined = tail + chunk
                    frames = joined.count(b"\nid: ")
                    if frames:
                        out.buckets[int(time.monotonic() / BUCKET_S)] += frames
                    tail = joined[-5:]
            except (aiohttp.ClientError, asyncio.CancelledError):
                pass

        async def sample_cpu() -> None:
            while True:
                out.cpu.append((time.monotonic(), time.process_time()))
                await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(read(r)) for r in responses]
        sampler = asyncio.create_task(sample_cpu())
        await until(lambda: told(CLOSE), every=0.05, within=900, what="the order to leave")
        sampler.cancel()
        for response in responses:
            response.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


def stalled_observers(base: str, session_id: str, count: int, after: int) -> list[socket.socket]:
    """``count`` connections that ask for the session's stream from ``after`` on and never read a
    byte (sync: a connect on loopback and one small send each)."""
    host, port = base.removeprefix("http://").split(":")
    request = (f"GET /v1/sessions/{session_id}/events HTTP/1.1\r\nHost: {host}\r\n"
               f"Last-Event-ID: {after}\r\n\r\n").encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(request)
        sockets.append(sock)
    return sockets


def tcp_memory_kb() -> int:
    """The kernel's TCP buffer memory, machine-wide (pages in /proc/net/sockstat)."""
    match = re.search(r"^TCP:.* mem (\d+)", Path("/proc/net/sockstat").read_text(), re.M)
    return int(match[1]) * 4 if match else 0


async def metrics_of(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("corral_observer"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


class Streamer:
    """The streaming session: turns back to back, each delta's arrival recorded."""

    def __init__(self, http: aiohttp.ClientSession, base: str, session_id: str, content: str):
        self.http, self.base, self.session_id, self.content = http, base, session_id, content
        self.deltas: list[float] = []
        self.turns = 0
        self.stop = False

    async def run(self) -> None:
        async with self.http.get(f"{self.base}/v1/sessions/{self.session_id}/events") as stream:
            frames = sse_frames(stream)
            while not self.stop:
                async with self.http.post(f"{self.base}/v1/sessions/{self.session_id}/messages",
                                          json={"content": self.content}) as response:
                    if response.status != 202:
                        raise RuntimeError(f"POST messages: {response.status} {await response.text()}")
                async for _, event, _ in frames:
                    if event == "message.delta":
                        self.deltas.append(time.monotonic())
                    elif event in TERMINAL:
                        break
                self.turns += 1


@dataclass
class Phase:
    name: str
    began: float = 0.0
    ended: float = 0.0
    server_cpu_s: float = 0.0
    rss_before_kb: int = 0
    rss_during_kb: int = 0
    rss_after_kb: int = 0
    tcp_before_kb: int = 0
    tcp_during_kb: int = 0
    tcp_after_kb: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    attached: int = 0


async def _observers_gauge(http: aiohttp.ClientSession, base: str) -> float:
    return (await metrics_of(http, base)).get("corral_observers", 0.0)


async def _wait_observers(http: aiohttp.ClientSession, base: str, count: int, what: str, *, up: bool = True) -> None:
    """Until the server counts at least (``up``) or at most ``count`` observers."""
    async def reached() -> bool:
        seen = await _observers_gauge(http, base)
        return seen >= count if up else seen <= count

    await until(reached, every=0.1, within=120, what=what)


async def audience(plan: AudiencePlan) -> dict[str, Any]:
    phases: list[Phase] = []
    async with fresh_server() as server, client() as http:
        base = server.base
        await create_agent(http, base, "streamer", token_ms=plan.token_ms)
        watched = await create_session(http, base, "streamer")
        streamer = Streamer(http, base, watched, " ".join(f"w{i}" for i in range(plan.words - 1)))
        background = [TurnLoad(base, "assistant", n, 0.0, 3600.0, interval_s=plan.background_interval_s, seed=i)
                      for i, n in enumerate(split(plan.background_sessions, 1))]
        reader_shares = [Readers(base, watched, n) for n in split(plan.readers, plan.generators)]
        async with crew(turn_worker, background) as turns, crew(reader_worker, reader_shares) as readers:
            await asyncio.gather(turns.go(), readers.go())
            driving = asyncio.create_task(streamer.run())
            # The streamer's own stream, and each background session's, are the observers of "none".
            base_observers = 1 + plan.background_sessions
            await _wait_observers(http, base, base_observers, "the background sessions' streams")
            for name in PHASES:
                phase = Phase(name)
                phase.rss_before_kb, phase.tcp_before_kb = server.rss_kb(), tcp_memory_kb()
                stalled: list[socket.socket] = []
                if name == "stalled":
                    async with http.get(f"{base}/v1/sessions/{watched}") as response:
                        after = int((await response.json())["last_event_seq"])
                    stalled = await asyncio.to_thread(stalled_observers, base, watched, plan.stalled, after)
                    phase.attached = plan.stalled
                elif name == "readers":
                    readers.sync.value.value = OPEN
                    phase.attached = plan.readers
                await _wait_observers(http, base, base_observers + phase.attached, f"{name}: observers attached")
                await asyncio.sleep(plan.settle_s)
                phase.began, cpu = time.monotonic(), server.cpu_seconds()
                await asyncio.sleep(plan.measure_s)
                phase.ended, phase.server_cpu_s = time.monotonic(), server.cpu_seconds() - cpu
                phase.rss_during_kb, phase.tcp_during_kb = server.rss_kb(), tcp_memory_kb()
                phase.metrics = await metrics_of(http, base)
                for sock in stalled:
                    sock.close()
                if name == "readers":
                    readers.sync.value.value = CLOSE
                await _wait_observers(http, base, base_observers, f"{name}: observers gone", up=False)
                await asyncio.sleep(plan.settle_s)
                phase.rss_after_kb, phase.tcp_after_kb = server.rss_kb(), tcp_memory_kb()
                phases.append(phase)
            streamer.stop = True
            turns.sync.value.value = 1
            await asyncio.wait_for(driving, 120)
            background_turns = merge_turns(await turns.results())
            (counts, *more) = await readers.results()
    reader_buckets = sum((c.buckets for c in [counts, *more]), Counter[int]())
    return {
        "plan": plan.__dict__,
        "phases": [_phase_result(p, streamer, background_turns.spans, reader_buckets, [counts, *more], plan)
                   for p in phases],
    }


def _phase_result(phase: Phase, streamer: Streamer, spans: list[tuple[float, float, float, float]],
                  buckets: Counter[int], readers: list[ReaderCounts], plan: AudiencePlan) -> dict[str, Any]:
    seconds = phase.ended - phase.began
    deltas = sum(1 for at in streamer.deltas if phase.began <= at <= phase.ended)
    latencies = [ended - started for started, _, _, ended in spans if phase.began <= started and ended <= phase.ended]
    lo, hi = int(phase.began / BUCKET_S), int(phase.ended / BUCKET_S)
    delivered = sum(n for bucket, n in buckets.items() if lo <= bucket < hi) if phase.name == "readers" else 0
    generator_cpu = 0.0
    if phase.name == "readers":
        for reader in readers:
            inside = [(t, c) for t, c in reader.cpu if phase.began <= t <= phase.ended]
            if len(inside) >= 2:
                generator_cpu += (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    return {
        "name": phase.name, "observers": phase.attached, "seconds": seconds,
        "deltas_per_s": deltas / seconds,
        "turns": summary(latencies) if latencies else None,
        "server_cpu": phase.server_cpu_s / seconds,
        "deliveries_per_s": delivered / (int(phase.ended / BUCKET_S) - lo) / BUCKET_S if delivered else 0.0,
        "generator_cpu": generator_cpu,
        "rss_kb": [phase.rss_before_kb, phase.rss_during_kb, phase.rss_after_kb],
        "tcp_kb": [phase.tcp_before_kb, phase.tcp_during_kb, phase.tcp_after_kb],
        "catch_ups": phase.metrics.get("corral_observer_catch_ups", 0.0),
    }


def audience_rows(results: dict[str, Any]) -> list[Row]:
    by_name = {p["name"]: p for p in results["phases"]}
    none = by_name["none"]
    alone_rate = none["deltas_per_s"]
    alone_p50 = none["turns"]["p50_ms"]
    rows = []
    for phase in results["phases"]:
        turns = phase["turns"]
        p50 = (f"p50 {turns['p50_ms']:.0f} ms (x{turns['p50_ms'] / alone_p50:.2f}), p99 {turns['p99_ms']:.0f} ms"
               if turns else "none ended inside the window")
        before, during, after = (kb / 1024 for kb in phase["rss_kb"])
        result = (f"**{phase['deltas_per_s']:,.0f} deltas/s** ({phase['deltas_per_s'] / alone_rate:.0%} of none); "
                  f"other sessions' turns {p50}; server CPU {phase['server_cpu']:.2f}; "
                  f"RSS {before:.0f} → {during:.0f} → {after:.0f} MB (after they left); "
                  f"catch-ups {phase['catch_ups']:.0f}")
        target, met = "", None
        if phase["name"] == "stalled":
            per_kb = (phase["rss_kb"][1] - phase["rss_kb"][0]) / max(1, phase["observers"])
            tcp = (phase["tcp_kb"][1] - phase["tcp_kb"][0]) / 1024
            result += f"; **{per_kb:.0f} KB RSS per stalled observer**, kernel TCP memory +{tcp:.0f} MB"
            target = "≥ 90% of none, p50 ≤ 1.2x, ≤ 100 KB each"
            met = (phase["deltas_per_s"] >= 0.9 * alone_rate and turns is not None
                   and turns["p50_ms"] <= 1.2 * alone_p50 and per_kb <= 100)
        elif phase["name"] == "readers":
            cpu_us = phase["server_cpu"] / phase["deliveries_per_s"] * 1e6 if phase["deliveries_per_s"] else 0
            result += (f"; **{phase['deliveries_per_s']:,.0f} deliveries/s**, {cpu_us:.1f} µs server CPU per "
                       f"delivery (readers' processes {phase['generator_cpu']:.2f} cores)")
            target = "≥ 30,000 deliveries/s, p50 ≤ 2x"
            met = (phase["deliveries_per_s"] >= 30_000 and turns is not None
                   and turns["p50_ms"] <= 2 * alone_p50)
        label = {"none": "nobody else watching", "stalled": f"{phase['observers']:,} observers that never read",
                 "readers": f"{phase['observers']:,} SSE readers", "none again": "nobody else watching, again"}
        rows.append(Row(f"audience: a session streaming (token_ms {results['plan']['token_ms']:g}), "
                        f"{label[phase['name']]}", result, target, met))
    return rows


# --- one stream per turn -------------------------------------------------------------------


MODES = ("session", "run", "one-request")


@dataclass(frozen=True)
class PerTurnPlan:
    clients: int = 100
    turns: int = 10
    latency_ms: int = 50
    generators: int = 2
    # A batch is about a second of turns on this machine: five, interleaved, keep the median's
    # ratios out of one slow second. LangGraph's batches take ten times as long: three of them.
    repeats: int = 5
    langgraph_repeats: int = 3
    langgraph: bool = True
    jobs_per_worker: tuple[int, ...] = (10, 100, 500)


PER_TURN_QUICK = PerTurnPlan(turns=3, repeats=1, langgraph_repeats=1, jobs_per_worker=(100,))


@dataclass(frozen=True)
class Clients:
    mode: str
    base: str
    count: int
    turns: int


@dataclass
class TurnSpans:
    spans: list[tuple[float, float, float]] = field(default_factory=list)  # (POST sent, first event, end)
    unavailable: str = ""


async def _read_run_stream(response: aiohttp.ClientResponse, began: float) -> tuple[float, float]:
    """Frames of one run's stream to its end; (first event, end) times."""
    first = 0.0
    async for _, event, _ in sse_frames(response):
        if not first:
            first = time.monotonic()
        if event in TERMINAL:
            break
    if not first:
        raise RuntimeError("the run's stream ended without events")
    return first, time.monotonic()


async def per_turn_worker(share: Clients, sync: Sync) -> TurnSpans:
    out = TurnSpans()
    async with client() as http:
        if share.mode == "session":
            opened = await asyncio.gather(*(open_session(http, share.base, "l50") for _ in range(share.count)))
        else:
            opened = [(await create_session(http, share.base, "l50"), None) for _ in range(share.count)]
        start = await sync.ready()
        del start

        async def one(session_id: str, stream: Any) -> None:
            url = f"{share.base}/v1/sessions/{session_id}/messages"
            for index in range(share.turns):
                content = {"content": f"turn {index}"}
                if share.mode == "session":
                    done = await turn(http, share.base, session_id, stream, content["content"])
                    out.spans.append((done.started, done.first_event, done.ended))
                    continue
                began = time.monotonic()
                if share.mode == "run":
                    async with http.post(url, json=content) as response:
                        if response.status != 202:
                            raise RuntimeError(f"POST messages: {response.status} {await response.text()}")
                        run_id = (await response.json())["run_id"]
                    async with http.get(f"{share.base}/v1/runs/{run_id}/events") as events:
                        first, ended = await _read_run_stream(events, began)
                else:
                    async with http.post(url, json=content, headers={"accept": "text/event-stream"}) as response:
                        if not response.headers.get("content-type", "").startswith("text/event-stream"):
                            out.unavailable = (f"`POST .../messages` with `Accept: text/event-stream` answered "
                                               f"{response.status} {response.headers.get('content-type')}")
                            return
                        first, ended = await _read_run_stream(response, began)
                out.spans.append((began, first, ended))

        try:
            await asyncio.gather(*(one(sid, stream) for sid, stream in opened))
        finally:
            for _, stream in opened:
                if stream is not None:
                    await stream.aclose()
    return out


async def _batch(mode: str, plan: PerTurnPlan) -> dict[str, Any]:
    async with fresh_server() as server, client() as http:
        await create_agent(http, server.base, "l50", latency_ms=plan.latency_ms)
        shares = [Clients(mode, server.base, n, plan.turns) for n in split(plan.clients, plan.generators)]
        async with crew(per_turn_worker, shares) as workers:
            start = await workers.go()
            cpu = server.cpu_seconds()
            parts = await workers.results()
            server_cpu_s = server.cpu_seconds() - cpu
    unavailable = next((p.unavailable for p in parts if p.unavailable), "")
    if unavailable:
        return {"unavailable": unavailable}
    spans = [s for p in parts for s in p.spans]
    seconds = max(end for _, _, end in spans) - start
    return {"turns": len(spans), "turns_per_s": len(spans) / seconds, "server_cpu": server_cpu_s / seconds,
            "cpu_ms_per_turn": server_cpu_s / len(spans) * 1000,
            "turn": summary([end - began for began, _, end in spans]),
            "first_event": summary([first - began for began, first, _ in spans])}


async def per_turn(plan: PerTurnPlan) -> dict[str, Any]:
    batches: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(plan.repeats):
        for mode in MODES:  # interleaved: a drift of the machine touches every mode alike
            batches[mode].append(await _batch(mode, plan))
    results: dict[str, Any] = {"clients": plan.clients, "turns": plan.turns, "latency_ms": plan.latency_ms,
                               "repeats": plan.repeats, "modes": {}}
    for mode, runs in batches.items():
        if any("unavailable" in run for run in runs):
            results["modes"][mode] = {"unavailable": next(r["unavailable"] for r in runs if "unavailable" in r)}
            continue
        results["modes"][mode] = {
            "turns_per_s": median(r["turns_per_s"] for r in runs), "turns_per_s_each": [r["turns_per_s"] for r in runs],
            "cpu_ms_per_turn": median(r["cpu_ms_per_turn"] for r in runs),
            "turn_p50_ms": median(r["turn"]["p50_ms"] for r in runs),
            "turn_p99_ms": median(r["turn"]["p99_ms"] for r in runs),
            "first_event_p50_ms": median(r["first_event"]["p50_ms"] for r in runs),
        }
    if plan.langgraph:
        peer_plan = peer.Plan(clients=plan.clients, runs_per_client=plan.turns, generators=plan.generators,
                              jobs_per_worker=plan.jobs_per_worker, repeats=plan.langgraph_repeats,
                              sweep_runs_per_client=min(2, plan.turns))
        try:
            results["langgraph"] = await peer.run_langgraph(peer_plan)
        except peer.PeerUnavailable as exc:
            results["langgraph"] = {"unavailable": str(exc)}
        except RuntimeError as exc:
            results["langgraph"] = {"unavailable": f"it failed under the workload: {str(exc)[-300:]}"}
    return results


def per_turn_rows(results: dict[str, Any]) -> list[Row]:
    modes = results["modes"]
    workload = (f"{results['clients']} sessions x {results['turns']} turns back to back, L={results['latency_ms']} ms, "
                f"median of {results['repeats']}")
    reference = modes["session"].get("turns_per_s")
    label = {"session": "the session's stream kept open", "run": "`POST`, then `GET /v1/runs/{id}/events` to its end",
             "one-request": "one request: `POST .../messages` with `Accept: text/event-stream`"}
    targets = {"run": 0.8, "one-request": 0.9}
    rows = []
    for mode in MODES:
        data = modes[mode]
        if "unavailable" in data:
            rows.append(Row(f"per-turn: {label[mode]} ({workload})", f"not measured: {data['unavailable']}",
                            f"≥ {targets[mode]:.0%} of the session stream" if mode in targets else "",
                            False if mode in targets else None))
            continue
        share = data["turns_per_s"] / reference if reference else 0.0
        result = (f"**{data['turns_per_s']:,.0f} turns/s**"
                  + (f" ({share:.0%} of the session stream)" if mode != "session" else "")
                  + f"; turn p50 {data['turn_p50_ms']:.0f} ms, p99 {data['turn_p99_ms']:.0f} ms; first event p50 "
                  f"{data['first_event_p50_ms']:.0f} ms; server CPU per turn {data['cpu_ms_per_turn']:.2f} ms")
        rows.append(Row(f"per-turn: {label[mode]} ({workload})", result,
                        f"≥ {targets[mode]:.0%} of the session stream" if mode in targets else "",
                        share >= targets[mode] if mode in targets else None))
    peer_result = results.get("langgraph")
    if peer_result is not None:
        if "unavailable" in peer_result:
            rows.append(Row("per-turn: LangGraph dev server, same workload",
                            f"not measured: {peer_result['unavailable']}"))
        else:
            ours = max((m["turns_per_s"] for m in modes.values() if "turns_per_s" in m), default=0.0)
            run_mode = modes["run"].get("turns_per_s", 0.0)
            ratio = run_mode / peer_result["runs_per_s"]
            rows.append(Row(
                f"per-turn: LangGraph dev server, `POST /threads/{{id}}/runs/stream` (`--n-jobs-per-worker "
                f"{peer_result['jobs_per_worker']}`, the best of a sweep)",
                f"**{peer_result['runs_per_s']:,.0f} runs/s**; Corral's run-stream workload is **x{ratio:.1f}** "
                f"(the best Corral way x{ours / peer_result['runs_per_s']:.1f}); run p50 "
                f"{peer_result['ended']['p50_ms']:.0f} ms", "≥ 5x (per-turn run stream)", ratio >= 5))
    return rows
