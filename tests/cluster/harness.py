"""Real ``corral serve`` processes on one fresh Postgres database, the workload tests send them,
and observers that follow sessions over Server-Sent Events.

- ``fresh_database()``: a uniquely named database for one test, dropped afterwards;
- ``Node``: one ``corral serve`` process on its own port and data directory, with ``kill``,
  ``stop``, ``pause``/``resume`` and ``restart``, its output in ``node.log`` in its data directory;
- ``ClusterHarness``: N nodes, and the calls a workload makes through a chosen or random node
  (sessions, messages with every 202 recorded, cancels, approvals), observers, ``settle`` and
  ``check`` (the history checker of ``tests.cluster.checker``).

The cluster's settings (``CORRAL_ADVERTISE_URL``, ``CORRAL_CLUSTER_SECRET``,
``CORRAL_LEASE_TTL_S``, ``CORRAL_HEARTBEAT_S``) go in as environment variables, which a server that does not know
them yet ignores, so the harness runs one node today and several once the cluster lands.
Every wait is bounded: the caller's ``asyncio.timeout`` bounds the polls, start-up has its
own deadline.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import httpx

from tests.cluster.checker import Accepted, Observation, Seen, check_history
from tests.conftest import PG_ADMIN
from tests.helpers import (
    POLL_S,
    STARTUP_DEADLINE_S,
    TERMINAL_EVENTS,
    clean_env,
    client,
    drop_database,
    free_port,
    parse_sse,
    sse_frames,
    until_event,
)

NODE_HEADER = "x-corral-node"
ACTIVE = ("queued", "running", "waiting")


# --- a database per test ------------------------------------------------------------------


def _server_dsn(database: str) -> str:
    """``CORRAL_TEST_PG``'s server and role (tests/conftest.py), on another database."""
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{database}"


def asyncpg_dsn(database_url: str) -> str:
    """A Corral ``postgresql+asyncpg://`` URL as asyncpg's own DSN."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@asynccontextmanager
async def fresh_database(prefix: str = "corral_t") -> AsyncIterator[str]:
    """A new, empty database on the test Postgres server; yields its Corral URL
    (``postgresql+asyncpg://<role>@host:port/<prefix>_<random>``) and drops it afterwards,
    after ending whatever connections are still open on it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin_dsn = _server_dsn("postgres")
    admin = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _server_dsn(name).replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await drop_database(admin, name)
        finally:
            await admin.close()


async def poll(check: Callable[[], Awaitable[bool]]) -> None:
    """``until`` for a condition that needs I/O to read (a process's HTTP answer, a database row):
    ask again every ``POLL_S``; the caller's ``asyncio.timeout`` bounds the wait."""
    while not await check():  # noqa: ASYNC110 - nothing to wait on but the condition itself
        await asyncio.sleep(POLL_S)


# --- one node ---------------------------------------------------------------------------------


class Node:
    """One ``corral serve`` process: its own loopback port and data directory (kept across
    restarts), its output appended to ``data_dir/node.log``, and a client for it (``http``)."""

    def __init__(self, index: int, data_dir: Path, env: Mapping[str, str], port: int | None = None):
        self.index = index
        self.port = port or free_port()
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "node.log"
        self.env = clean_env(**{**env, "CORRAL_ADVERTISE_URL": self.url})
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False
        self.starts = 0
        self.node_id: str | None = None  # the server's own id, from x-corral-node (a new one each start)
        self.http = client(self.url)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "down"
        return f"<Node {self.index} {self.url} pid={self.pid} {state} starts={self.starts}>"

    @property
    def name(self) -> str:
        return f"node {self.index}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        """The process is there (paused or not)."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def live(self) -> bool:
        """Running and not paused: it can answer."""
        return self.running and not self.paused

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no output)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def start(self) -> None:
        """Start the process and wait until ``GET /healthz`` answers (``STARTUP_DEADLINE_S`` at most)."""
        assert not self.running, f"{self.name} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- {self.name}: start {self.starts} on port {self.port} ---\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                env=self.env, cwd=self.data_dir, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill takes whatever it started too
            )
        self.paused = False
        try:
            await self._wait_healthy()
        except BaseException:
            await self.kill()
            raise

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) during start-up:\n"
                                     f"{self.log_tail()}")
            with suppress(httpx.TransportError):
                response = await self.http.get("/healthz", timeout=2.0)
                if response.status_code == 200:
                    self.node_id = response.headers.get(NODE_HEADER)
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not healthy after {STARTUP_DEADLINE_S} s:\n{self.log_tail()}")
            await asyncio.sleep(POLL_S)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL (its whole process group), and reap it: a crash."""
        if self.running:
            self._signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()
        self.paused = False

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM and wait for the exit, at most ``within`` s (then SIGKILL and fail); the exit code."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        if self.paused:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                return await self.proc.wait()
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"{self.name} did not stop within {within} s of SIGTERM:\n{self.log_tail()}") from None

    def pause(self) -> None:
        """SIGSTOP: the process stays, answers nothing and commits nothing until ``resume``."""
        assert self.running, f"{self.name} is not running"
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        assert self.running, f"{self.name} is not running"
        self._signal(signal.SIGCONT)
        self.paused = False

    async def restart(self) -> None:
        """A new process on the same port and data directory (the old one killed if still there)."""
        # The same client serves the new process: a kept-alive connection to the old one is closed
        # from the server's side, so the pool drops it rather than reuse it.
        await self.kill()
        await self.start()

    async def aclose(self) -> None:
        await self.kill()
        await self.http.aclose()


# --- observers --------------------------------------------------------------------------------


class Observer:
    """Follows ``GET /v1/sessions/{id}/events`` on one node from seq ``after`` and records every
    event it receives. When the stream breaks it resumes with ``Last-Event-ID`` (on the same node,
    or, with ``failover``, on the next node that can answer), so a complete record means the
    resumption lost and repeated nothing. A stream on a paused node stays open and silent until
    the node resumes or ``read_timeout_s`` passes. Start it with ``ClusterHarness.observe``."""

    def __init__(self, cluster: ClusterHarness, session_id: str, node: Node, after: int = 0, *,
                 failover: bool = True, label: str | None = None, read_timeout_s: float = 20.0):
        self.cluster = cluster
        self.read_timeout_s = read_timeout_s  # a stream silent this long is dead (the server pings every 15 s)
        self.session_id = session_id
        self.node = node
        self.after = after
        self.failover = failover
        self.label = label or f"observer #{len(cluster.observers)} (node {node.index}, after {after})"
        self.seen: list[Seen] = []
        self.connections: list[tuple[int, int]] = []  # (node index, Last-Event-ID) of each stream opened
        self.connected = asyncio.Event()  # the first stream answered 200
        self.error: BaseException | None = None
        self._progress = asyncio.Event()  # set at each event received, and when the task ends
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Observer {self.label}: {len(self.seen)} events, last seq {self.last_seq}>"

    @property
    def last_seq(self) -> int:
        return self.seen[-1].seq if self.seen else self.after

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=self.label)
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
        self.connected.set()  # whoever waits for the connection learns of the end
        self._progress.set()

    async def _follow(self) -> None:
        while True:
            try:
                await self._stream()
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass  # the node went away or refused for now: resume where we are
            if self.failover and not self.node.live:
                self.node = await self._next_node()
            await asyncio.sleep(POLL_S)

    async def _next_node(self) -> Node:
        while True:
            live = [n for n in self.cluster.nodes if n.live]
            if live:
                after = [n for n in live if n.index > self.node.index]
                return (after or live)[0]
            await asyncio.sleep(POLL_S)

    async def _stream(self) -> None:
        last = self.last_seq
        timeout = httpx.Timeout(5.0, read=self.read_timeout_s)
        async with self.node.http.stream("GET", f"/v1/sessions/{self.session_id}/events",
                                         headers={"Last-Event-ID": str(last)}, timeout=timeout) as response:
            if response.status_code >= 500:
                response.raise_for_status()
            assert response.status_code == 200, f"{self.label}: {response.status_code} {await response.aread()!r}"
            self.connections.append((self.node.index, last))
            self.connected.set()
            async for frame in parse_sse(response.aiter_lines()):
                self.seen.append(Seen(frame.seq, frame.event, frame.json.get("run_id"), self.node.index))
                self._progress.set()

    async def wait_seq(self, seq: int) -> None:
        """Until this observer has received seq ``seq`` (or more)."""
        while self.last_seq < seq:
            self._raise_if_failed()
            self._progress.clear()
            await self._progress.wait()

    async def wait_event(self, type_: str, *, run_id: str | None = None, after: int | None = None) -> Seen:
        """The first received event of ``type_`` (and ``run_id``) after seq ``after`` (default: its start),
        waiting for it if need be."""
        start = self.after if after is None else after
        checked = 0
        while True:
            for seen in self.seen[checked:]:
                if seen.seq > start and seen.type == type_ and (run_id is None or seen.run_id == run_id):
                    return seen
            checked = len(self.seen)
            self._raise_if_failed()
            self._progress.clear()
            await self._progress.wait()

    def _raise_if_failed(self) -> None:
        if self._task is not None and self._task.done():
            raise AssertionError(f"{self.label} stopped: {self.error!r}") from self.error

    def observation(self) -> Observation:
        return Observation(self.session_id, self.after, tuple(self.seen), self.label)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self.error is not None:
            raise AssertionError(f"{self.label} failed") from self.error


# --- the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A message the cluster did not accept: the answer's status and body, or None and the transport
    error when no answer came (a node that died or hung: the input may or may not be stored)."""

    session_id: str
    node: int
    status: int | None
    body: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


NodeChoice = int | Node | None


class ClusterHarness:
    """``size`` ``corral serve`` nodes on ``database_url``, each with a data directory under ``root``.

    ``async with ClusterHarness(url, tmp_path, 3) as cluster:`` starts the first node (which
    migrates the fresh database), then the others together, each ready when it answers
    ``/healthz``; on exit, whatever happened, observers are closed and every process is killed.
    A workload call takes ``node=``: an index, a ``Node``, or None for a random live node.
    """

    def __init__(self, database_url: str, root: Path, size: int = 3, *, lease_ttl_s: float = 3.0,
                 heartbeat_s: float | None = None, env: Mapping[str, str] | None = None, seed: int | None = None):
        self.database_url = database_url
        self.root = root
        self.size = size
        self.secret = secrets.token_hex(16)
        self.lease_ttl_s = lease_ttl_s
        self.env = {
            "CORRAL_DATABASE_URL": database_url,
            "CORRAL_CLUSTER_SECRET": self.secret,
            "CORRAL_LEASE_TTL_S": str(lease_ttl_s),
            # A node must renew its lease well within it (settings refuse heartbeat_s >= lease_ttl_s / 2).
            "CORRAL_HEARTBEAT_S": str(heartbeat_s or lease_ttl_s / 4),
            "CORRAL_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.random = random.Random(seed)
        self.nodes: list[Node] = []
        self.accepted: list[Accepted] = []
        self.refused: list[Refused] = []
        self.observers: list[Observer] = []
        self._db: asyncpg.Connection | None = None
        self._exit = AsyncExitStack()

    def __repr__(self) -> str:
        return (f"<ClusterHarness {len(self.nodes)} nodes ({sum(n.live for n in self.nodes)} live), "
                f"{len(self.accepted)} accepted, {len(self.refused)} refused, {len(self.observers)} observers>")

    async def __aenter__(self) -> ClusterHarness:
        try:
            self._exit.push_async_callback(self._close)
            for _ in range(self.size):
                self.nodes.append(Node(len(self.nodes), self.root / f"node{len(self.nodes)}", self.env))
            if self.nodes:
                await self.nodes[0].start()  # migrates the fresh database alone
                await asyncio.gather(*(node.start() for node in self.nodes[1:]))
            self._db = await asyncpg.connect(asyncpg_dsn(self.database_url), timeout=5)
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._exit.aclose()

    async def _close(self) -> None:
        errors = []
        for observer in self.observers:
            try:
                await observer.aclose()
            except AssertionError as error:
                errors.append(error)
        for node in self.nodes:
            await node.aclose()
        if self._db is not None:
            await self._db.close()
        if errors:
            raise errors[0]

    async def add_node(self) -> Node:
        """One more node, started and ready."""
        node = Node(len(self.nodes), self.root / f"node{len(self.nodes)}", self.env)
        self.nodes.append(node)
        await node.start()
        return node

    def node(self, which: NodeChoice = None) -> Node:
        """Node ``which`` (an index or a node), or a random live one."""
        if isinstance(which, Node):
            return which
        if which is not None:
            return self.nodes[which]
        live = [n for n in self.nodes if n.live]
        assert live, f"no live node: {self.nodes}"
        return self.random.choice(live)

    def by_id(self, node_id: str) -> Node:
        """The node whose server calls itself ``node_id`` (``x-corral-node``)."""
        found = [n for n in self.nodes if n.node_id == node_id]
        assert found, f"no node {node_id} among {[n.node_id for n in self.nodes]}"
        return found[0]

    # --- the workload's calls --------------------------------------------------------------

    async def create_agent(self, name: str, node: NodeChoice = None, **spec: Any) -> None:
        """``POST /v1/agents`` (provider ``demo`` unless given), then wait until every live node
        reports it ``ready``."""
        response = await self.node(node).http.post("/v1/agents", json={"name": name, "provider": "demo", **spec})
        assert response.status_code == 201, response.text
        for each in [n for n in self.nodes if n.live]:
            await poll(functools.partial(self._agent_ready, each, name))

    @staticmethod
    async def _agent_ready(node: Node, name: str) -> bool:
        response = await node.http.get(f"/v1/agents/{name}")
        if response.status_code == 200 and response.json()["state"] == "failed":
            raise AssertionError(f"agent {name} failed on {node.name}: {response.text}")
        return response.status_code == 200 and response.json()["state"] == "ready"

    async def create_session(self, agent: str = "assistant", node: NodeChoice = None, key: str | None = None) -> str:
        body: dict[str, Any] = {"agent": agent}
        if key is not None:
            body["key"] = key
        response = await self.node(node).http.post("/v1/sessions", json=body)
        assert response.status_code in (200, 201), response.text
        return str(response.json()["id"])

    async def offer(self, session_id: str, content: str, mode: str = "queue", node: NodeChoice = None,
                    **extra: Any) -> Accepted | Refused:
        """``POST /v1/sessions/{id}/messages``; a 202 is recorded in ``accepted``, anything else
        (an error status, or no answer at all from a node that died) in ``refused``."""
        target = self.node(node)
        sent_at = datetime.now(UTC)
        try:
            response = await target.http.post(f"/v1/sessions/{session_id}/messages",
                                              json={"content": content, "mode": mode, **extra})
        except httpx.TransportError as error:
            refused = Refused(session_id, target.index, None, repr(error))
            self.refused.append(refused)
            return refused
        if response.status_code != 202:
            refused = Refused(session_id, target.index, response.status_code, response.text)
            self.refused.append(refused)
            return refused
        body = response.json()
        accepted = Accepted(body["input_id"], body["run_id"], body["session_id"], body["disposition"], mode,
                            target.index, response.headers.get(NODE_HEADER), sent_at, datetime.now(UTC))
        self.accepted.append(accepted)
        return accepted

    async def send(self, session_id: str, content: str, mode: str = "queue", node: NodeChoice = None,
                   **extra: Any) -> Accepted:
        """``offer`` that must be accepted."""
        answer = await self.offer(session_id, content, mode, node, **extra)
        assert isinstance(answer, Accepted), answer
        return answer

    async def cancel(self, run_id: str, mode: str = "soft", node: NodeChoice = None) -> httpx.Response:
        """``POST /v1/runs/{id}/cancel``: 202, or 409 when the run had already ended."""
        response = await self.node(node).http.post(f"/v1/runs/{run_id}/cancel", json={"mode": mode})
        assert response.status_code in (202, 409), response.text
        return response

    async def decide(self, run_id: str, call_id: str, decision: str = "approve",
                     node: NodeChoice = None) -> httpx.Response:
        """``POST /v1/runs/{id}/approvals/{call_id}``, which must be taken (202)."""
        response = await self.node(node).http.post(f"/v1/runs/{run_id}/approvals/{call_id}",
                                                   json={"decision": decision})
        assert response.status_code == 202, response.text
        return response

    async def approval_requested(self, run_id: str, node: NodeChoice = None, after: int = 0) -> str:
        """The call id of the run's first ``approval.requested`` event after seq ``after`` (read off
        the run's stream, waiting for it if need be)."""
        async with self.node(node).http.stream("GET", f"/v1/runs/{run_id}/events",
                                               params={"after": after}) as response:
            frame = await until_event(sse_frames(response), "approval.requested", *TERMINAL_EVENTS, run_id=run_id)
        assert frame.event == "approval.requested", f"run {run_id} ended ({frame.event}) without asking"
        return str(frame.json["call_id"])

    async def wait_run(self, run_id: str, node: NodeChoice = None) -> dict[str, Any]:
        """The run once it has ended (its stream ends after its terminal event)."""
        http = self.node(node).http
        async with http.stream("GET", f"/v1/runs/{run_id}/events") as response:
            await until_event(sse_frames(response), *TERMINAL_EVENTS, run_id=run_id)
        response = await http.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def observe(self, session_id: str, node: NodeChoice = None, after: int = 0, *,
                      failover: bool = True, label: str | None = None, read_timeout_s: float = 20.0) -> Observer:
        """An observer of the session on a node, from seq ``after``, once its stream is open."""
        observer = Observer(self, session_id, self.node(node), after, failover=failover, label=label,
                            read_timeout_s=read_timeout_s)
        self.observers.append(observer)
        observer.start()
        await observer.connected.wait()
        observer._raise_if_failed()
        return observer

    # --- reading the database directly -----------------------------------------------------

    @property
    def db(self) -> asyncpg.Connection:
        assert self._db is not None, "the harness is not entered"
        return self._db

    def sessions(self) -> set[str]:
        """The sessions the workload sent messages to."""
        return {a.session_id for a in self.accepted} | {r.session_id for r in self.refused}

    async def last_seq(self, session_id: str) -> int:
        return int(await self.db.fetchval("SELECT coalesce(max(seq), 0) FROM events WHERE session_id = $1",
                                          session_id))

    async def unfinished(self, sessions: set[str] | None = None) -> int:
        """Runs of ``sessions`` (default: all) still queued, running or waiting, in the database."""
        chosen = sorted(self.sessions() if sessions is None else sessions)
        return int(await self.db.fetchval(
            "SELECT count(*) FROM runs WHERE session_id = ANY($1::text[]) AND status = ANY($2::text[])",
            chosen, list(ACTIVE)))

    async def settle(self, sessions: set[str] | None = None) -> None:
        """Until no run of ``sessions`` (default: those the workload wrote to) is unfinished in the
        database, then until every observer has received its session's last event."""
        await poll(lambda: self._settled(sessions))
        for observer in self.observers:
            await observer.wait_seq(await self.last_seq(observer.session_id))

    async def _settled(self, sessions: set[str] | None) -> bool:
        return await self.unfinished(sessions) == 0

    async def check(self, *, sessions: set[str] | None = None, settled: bool = True) -> list[str]:
        """The checker's violations over the database, the recorded 202s and every observer."""
        return await check_history(self.database_url, self.accepted, [o.observation() for o in self.observers],
                                   sessions=sessions, settled=settled)
