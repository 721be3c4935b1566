"""The load generator: aiohttp in several processes, started together by a barrier.

Why processes: one Python process parsing SSE and HTTP tops out at a few thousand requests
a second, which is the order of what the server under test does; a generator that saturates
would measure itself. Each worker reports the CPU time it used inside the measured window, so
a result carries its own proof: a generator well under 100% of a core was not the bottleneck.

Why a barrier: every worker first does its set-up (creates its sessions, opens its streams),
then all of them and the parent pass the barrier at once, so the measured window holds only
the steady load. Times are `time.monotonic()`, which on Linux is one clock for every process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import queue
import random
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.sse import sse_events

TERMINAL = frozenset({"run.completed", "run.failed", "run.cancelled", "run.interrupted"})
SETUP_TIMEOUT_S = 300.0
_SPAWN = multiprocessing.get_context("spawn")  # no fork of a process that runs an event loop


@dataclass
class Sync:
    """What a worker shares with the parent: the start barrier and one number the parent may set."""

    barrier: multiprocessing.synchronize.Barrier
    value: Any  # a multiprocessing Value('d'): e.g. the last seq observers must reach

    async def ready(self) -> float:
        """Wait (in a thread: the barrier blocks) until everyone is set up; returns the start time."""
        await asyncio.to_thread(self.barrier.wait, SETUP_TIMEOUT_S)
        return time.monotonic()


Worker = Callable[[Any, Sync], Coroutine[Any, Any, Any]]


def _child(worker: Worker, share: Any, sync: Sync, index: int, results: Any) -> None:
    try:
        results.put((index, True, asyncio.run(worker(share, sync))))
    except BaseException:
        sync.barrier.abort()  # nobody waits for a worker that will never arrive
        results.put((index, False, traceback.format_exc()))


class Crew:
    """Worker processes running ``worker(share, sync)``, one per share."""

    def __init__(self, worker: Worker, shares: list[Any]):
        self.sync = Sync(_SPAWN.Barrier(len(shares) + 1), _SPAWN.Value("d", 0.0))
        self._results = _SPAWN.Queue()
        self._processes = [
            _SPAWN.Process(target=_child, args=(worker, share, self.sync, index, self._results), daemon=True)
            for index, share in enumerate(shares)
        ]

    def start(self) -> None:
        for process in self._processes:
            process.start()

    async def go(self) -> float:
        """Once every worker is set up, release them all; returns the start time.

        A worker that dies before the barrier (even before its own code runs) breaks it at
        once, and its error is raised here rather than after the set-up timeout.
        """
        waiting = asyncio.create_task(self.sync.ready())
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.2)
            if not waiting.done() and any(p.exitcode not in (None, 0) for p in self._processes):
                self.sync.barrier.abort()
        try:
            return waiting.result()
        except threading.BrokenBarrierError:
            await self.results(within=5.0)  # raises the worker's own error, which says more
            raise

    async def results(self, within: float = 600.0) -> list[Any]:
        """Each worker's return value, in share order; a worker's exception is raised here."""
        collected: dict[int, Any] = {}
        deadline = time.monotonic() + within
        while len(collected) < len(self._processes):
            try:
                index, ok, value = await asyncio.to_thread(self._results.get, True, 1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("load generators did not finish in time") from None
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in self._processes):
                    raise RuntimeError("a load generator process died") from None
                continue
            if not ok:
                raise RuntimeError(f"load generator {index} failed:\n{value}")
            collected[index] = value
        return [collected[index] for index in range(len(self._processes))]

    def stop(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=5)


@asynccontextmanager
async def crew(worker: Worker, shares: list[Any]) -> AsyncIterator[Crew]:
    started = Crew(worker, shares)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def split(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` workers, as evenly as possible (no empty worker)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def client(limit: int = 0, timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """An aiohttp session with no connection cap (the load decides how many connections)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


# --- the no-op ceiling ---------------------------------------------------------------------


@dataclass(frozen=True)
class NoopLoad:
    base: str
    connections: int
    warmup_s: float
    measure_s: float
    path: str = "/healthz"


async def noop_worker(load: NoopLoad, sync: Sync) -> dict[str, float]:
    """``connections`` loops each sending ``GET path`` back to back; counts answers in the window."""
    async with client() as http:
        url = load.base + load.path
        async with http.get(url) as response:  # one request first, so set-up is not measured
            await response.read()
        start = await sync.ready()
        window = (start + load.warmup_s, start + load.warmup_s + load.measure_s)
        done = 0
        cpu: list[float] = []

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < window[1]:
                async with http.get(url) as response:
                    await response.read()
                if window[0] <= time.monotonic() <= window[1]:
                    done += 1

        cpu_task = asyncio.create_task(_cpu_in_window(window, cpu))
        await asyncio.gather(*(loop() for _ in range(load.connections)))
        await cpu_task
    return {"requests": done, "seconds": load.measure_s, "cpu_s": cpu[1] - cpu[0]}


async def _cpu_in_window(window: tuple[float, float], into: list[float]) -> None:
    """This process's CPU time at the window's start and end (how busy the generator was)."""
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    into.append(time.process_time())
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    into.append(time.process_time())


# --- turns -----------------------------------------------------------------------------------


class SessionStream:
    """A session's SSE stream read by its own task, so every event is timed when it arrives
    (not when the turn's code gets round to it) and a turn can wait for its run to end."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.first: dict[str, tuple[float, str]] = {}  # run -> (time, type) of its first event
        self.started: dict[str, float] = {}  # run -> time of its run.started
        self._ended: dict[str, asyncio.Future[float]] = {}
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in sse_events(self.response):
            now = time.monotonic()
            run_id = event.get("run_id")
            if run_id is None:
                continue
            kind = event["type"]
            self.first.setdefault(run_id, (now, kind))
            if kind == "run.started":
                self.started.setdefault(run_id, now)
            elif kind in TERMINAL:
                future = self.ended(run_id)
                if not future.done():
                    future.set_result(now)

    def ended(self, run_id: str) -> asyncio.Future[float]:
        future = self._ended.get(run_id)
        if future is None:
            future = self._ended[run_id] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, run_id: str) -> None:
        self.first.pop(run_id, None)
        self.started.pop(run_id, None)
        self._ended.pop(run_id, None)

    async def aclose(self) -> None:
        self.task.cancel()
        self.response.close()


async def open_session(http: aiohttp.ClientSession, base: str, agent: str) -> tuple[str, SessionStream]:
    async with http.post(f"{base}/v1/sessions", json={"agent": agent}) as response:
        response.raise_for_status()
        session_id = str((await response.json())["id"])
    stream = await http.get(f"{base}/v1/sessions/{session_id}/events")
    stream.raise_for_status()
    return session_id, SessionStream(stream)


@dataclass(frozen=True)
class Turn:
    started: float  # the POST was sent
    first_event: float
    first_type: str  # which event came first (run.queued: the run's record, before it starts)
    run_started: float
    ended: float


async def turn(http: aiohttp.ClientSession, base: str, session_id: str, stream: SessionStream,
               content: str) -> Turn:
    """POST one message and wait on the session's stream for its run to end."""
    started = time.monotonic()
    async with http.post(f"{base}/v1/sessions/{session_id}/messages", json={"content": content}) as response:
        if response.status != 202:
            raise RuntimeError(f"POST messages: {response.status} {await response.text()}")
        run_id = str((await response.json())["run_id"])
    ended = await stream.ended(run_id)
    first, first_type = stream.first[run_id]
    run_started = stream.started.get(run_id, ended)  # a run cancelled before it started has none
    stream.forget(run_id)
    return Turn(started, first, first_type, run_started, ended)


@dataclass(frozen=True)
class TurnLoad:
    """``sessions`` sessions doing turns for warm-up + measure seconds, back to back, or one
    turn every ``interval_s`` seconds per session (an offered load) when it is set. The parent
    may end the load early by setting ``sync.value`` (sessions stop after their current turn)."""

    base: str
    agent: str
    sessions: int
    warmup_s: float
    measure_s: float
    interval_s: float | None = None
    content: str = "hello"
    seed: int = 0


@dataclass
class TurnResult:
    seconds: float = 0.0
    cpu_s: float = 0.0
    # (POST sent, first event of the run, run.started, terminal event) for each turn that ended in the window
    spans: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.spans)

    @property
    def latencies(self) -> list[float]:
        return [ended - started for started, _, _, ended in self.spans]

    @property
    def first_events(self) -> list[float]:
        return [first - started for started, first, _, _ in self.spans]

    @property
    def run_starts(self) -> list[float]:
        return [run_started - started for started, _, run_started, _ in self.spans]


async def turn_worker(load: TurnLoad, sync: Sync) -> TurnResult:
    """Times every turn that ends inside the window: POST to the run's first SSE event and to
    its terminal event."""
    rng = random.Random(load.seed)
    result = TurnResult(seconds=load.measure_s)
    async with client() as http:
        opened = await asyncio.gather(*(open_session(http, load.base, load.agent) for _ in range(load.sessions)))
        start = await sync.ready()
        window = (start + load.warmup_s, start + load.warmup_s + load.measure_s)

        async def drive(session_id: str, stream: SessionStream) -> None:
            next_at = start + (rng.uniform(0, load.interval_s) if load.interval_s else 0.0)
            count = 0
            while True:
                if load.interval_s:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += load.interval_s
                if time.monotonic() >= window[1] or sync.value.value:
                    return
                done = await turn(http, load.base, session_id, stream, f"{load.content} {count}")
                count += 1
                if window[0] <= done.ended <= window[1]:
                    result.spans.append((done.started, done.first_event, done.run_started, done.ended))

        cpu: list[float] = []
        cpu_task = asyncio.create_task(_cpu_in_window(window, cpu))
        try:
            await asyncio.gather(*(drive(session_id, stream) for session_id, stream in opened))
            if not sync.value.value:
                await cpu_task
        finally:
            cpu_task.cancel()
            for _, stream in opened:
                await stream.aclose()
    result.cpu_s = cpu[1] - cpu[0] if len(cpu) == 2 else 0.0
    return result


def merge_turns(results: list[TurnResult]) -> TurnResult:
    merged = TurnResult(seconds=results[0].seconds)
    for part in results:
        merged.cpu_s += part.cpu_s
        merged.spans += part.spans
    return merged
