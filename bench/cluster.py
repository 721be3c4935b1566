"""Cluster: several `corral serve` nodes on one Postgres database (issue 14, docs/cluster.md).

Every configuration starts its nodes on a database of its own, created for it and dropped
after (on the Postgres server of `CORRAL_TEST_PG`, the one the tests use: 127.0.0.1:5432 by
default), each node with its own port, data directory and log.

- throughput: S=P=100 sessions on a demo agent of latency L doing turns back to back (as
  `bench.throughput` does) on 1, 2 and 3 nodes, and on one SQLite node beside them. Sessions
  are created round robin over the nodes, so each node owns a share; a session's SSE stream is
  opened on its owner (named by `x-corral-node` in the creation's answer), and its writes go
  either to the owner or each to a random node (then (N-1)/N of them are forwarded). Each
  node's CPU, the Postgres server's (this database's backends and the server's own processes,
  with the backends that exited meanwhile), the whole machine's busy time (`/proc/stat`), the
  connections opened to the database and each node's group commits (`/metrics`) are read over
  the measured window;
- forwarding: on an idle 2-node cluster, one session doing turns one at a time, its
  `POST .../messages` sent alternately to its owner and to the other node; each sample is the
  POST's time to its 202;
- takeover: a node owning sessions with queued work (runs parked on an approval with inputs
  queued behind them, and runs inside a model call with one input behind) gets SIGKILL; the
  other node is asked for one of its sessions every 0.1 s until it answers 202. Then the parked
  runs are approved through the survivor and the time to drain every run of the dead node's
  sessions is taken; `tests/cluster/checker.py` (the cluster tests' history checker) reads
  the history back: nothing lost, nothing executed twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.load import SessionStream, Sync, client, crew, split
from bench.report import Row, markdown_table
from bench.server import Server, free_port, wait_answering
from bench.stats import summary

NODE_HEADER = "x-corral-node"
TICKS = os.sysconf("SC_CLK_TCK")
PG_SERVER = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test").rsplit("/", 1)[0]
ACTIVE = ["queued", "running", "waiting"]
# A client backend's process title: "postgres: 15/main: USER DATABASE HOST(PORT) STATE".
BACKEND = re.compile(r"postgres: \S+: \S+ (\S+) (?:\S+\(\d+\)|\[local\])")
PARK = '/tool wait {"ms": 1}'  # on an agent whose `wait` tool asks for approval: the run parks


@dataclass(frozen=True)
class Plan:
    generators: int = 2
    warmup_s: float = 2.0
    measure_s: float = 10.0
    sessions: int = 100
    limit: int = 100
    latencies: tuple[int, ...] = (0, 200)
    nodes: tuple[int, ...] = (1, 2, 3)
    routings: tuple[str, ...] = ("owner", "random")
    sqlite: bool = True  # one SQLite node beside one Postgres node, at each latency
    lease_ttl_s: float = 10.0  # the default
    heartbeat_s: float = 2.0  # the default
    forward_samples: int = 200  # each way
    idle_s: float = 5.0  # an idle 2-node cluster's CPU, read over this long
    parked_sessions: int = 100  # takeover: sessions with a run parked on an approval...
    queued_per_session: int = 5  # ... and this many inputs queued behind it
    sleeping_sessions: int = 20  # takeover: sessions inside a model call (interrupted by the kill)
    sleep_s: float = 3.0


QUICK = Plan(warmup_s=1.0, measure_s=3.0, forward_samples=60, idle_s=2.0, lease_ttl_s=5.0, heartbeat_s=1.0,
             parked_sessions=40, queued_per_session=3, sleeping_sessions=10)


# --- CPU: nodes, Postgres, the machine -----------------------------------------------------------


def _ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _postgres_ticks(database: str | None) -> dict[int, int]:
    """pid -> CPU ticks of the Postgres server's processes that work for ``database``: its client
    backends, and the server's own (postmaster, WAL writer, checkpointer...), which serve every
    database; other databases' live backends (other people's tests) are left out. A process's
    ticks include those of its exited children: the postmaster's count every backend that ended
    (of any database), so connections opened and closed inside a window are not missed."""
    found: dict[int, int] = {}
    if database is None:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.split("(", 1)[1].rsplit(")", 1)[0] != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        backend = BACKEND.match(title)
        if backend is None or backend.group(1) == database:
            fields = stat.rsplit(")", 1)[1].split()
            found[int(entry.name)] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return found


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal, sum(values)


@dataclass(frozen=True)
class Snapshot:
    at: float
    nodes: list[int | None]
    postgres: dict[int, int]
    machine: tuple[int, int]


def snapshot(pids: list[int], database: str | None) -> Snapshot:
    return Snapshot(time.monotonic(), [_ticks(pid) for pid in pids], _postgres_ticks(database), _machine_ticks())


def cpu_between(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Cores used between two snapshots: each node, Postgres (processes alive at both), the machine."""
    seconds = after.at - before.at
    nodes = [(b2 - b1) / TICKS / seconds if b1 is not None and b2 is not None else 0.0
             for b1, b2 in zip(before.nodes, after.nodes, strict=True)]
    postgres = sum(max(0, ticks - before.postgres[pid]) for pid, ticks in after.postgres.items()
                   if pid in before.postgres) / TICKS / seconds
    busy = (after.machine[0] - before.machine[0]) / TICKS / seconds
    return {"seconds": seconds, "nodes": nodes, "postgres": postgres, "machine_busy": busy}


# --- a database and the nodes on it ----------------------------------------------------------------


@asynccontextmanager
async def fresh_database(prefix: str = "corral_bench") -> AsyncIterator[str]:
    """A new, empty database on the Postgres server; yields its Corral URL, drops it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{PG_SERVER}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        admin = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
        try:
            # DROP ... WITH (FORCE) by hand (that needs Postgres 13+), as tests/helpers/postgres.py does
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()


def asyncpg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass
class Node:
    index: int
    server: Server
    node_id: str

    @property
    def base(self) -> str:
        return self.server.base


@dataclass
class Cluster:
    """Nodes on one database (``database_url`` None: one node on SQLite in its data directory).
    ``findings`` holds what the nodes' logs said at ERROR or above (and how many warnings),
    filled in when the cluster stops."""

    database_url: str | None
    nodes: list[Node] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)

    def by_id(self) -> dict[str, Node]:
        return {node.node_id: node for node in self.nodes}


async def _start_node(index: int, root: Path, database_url: str | None, env: dict[str, str]) -> Node:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = root / f"node{index}"
    data_dir.mkdir(parents=True)
    # No CORRAL_* setting of the caller's leaks in (a CORRAL_DATABASE_URL would join the wrong database).
    full = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    full |= {"CORRAL_LOG_LEVEL": "warning", **env}
    if database_url is not None:
        full |= {"CORRAL_DATABASE_URL": database_url, "CORRAL_ADVERTISE_URL": base}
    command = [sys.executable, "-m", "corral", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    process = _spawn(command, full, data_dir / "server.log")
    server = Server(base, process, data_dir)

    def failed(why: str) -> RuntimeError:
        tail = (data_dir / "server.log").read_text(errors="replace").splitlines()[-20:]
        return RuntimeError(f"node {index} ({base}) {why}; the end of its log:\n" + "\n".join(tail))

    try:
        await wait_answering(f"{base}/healthz", process, within=60.0, poll_s=0.05, fail=failed)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as response:
            node_id = response.headers.get(NODE_HEADER, f"node{index}")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Node(index, server, node_id)


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a node with its output appended to its log (sync: it only forks)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=log)


def _stop(node: Node) -> None:
    process = node.server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _level(line: str) -> str:
    """A log line's level: from the JSON a node writes when its output is not a terminal, else
    from the words of the human format or of a bare traceback."""
    if line.startswith("{"):
        with suppress(ValueError, AttributeError):
            record = json.loads(line)
            return "error" if record.get("exception") else str(record.get("level", ""))
    for level in ("CRITICAL", "ERROR", "WARNING"):
        if f" {level} " in line:
            return level.lower()
    return "error" if line.startswith("Traceback") else ""


def _read_logs(nodes: list[Node]) -> dict[str, Any]:
    errors: list[str] = []
    warnings: list[str] = []
    for node in nodes:
        for line in (node.server.data_dir / "server.log").read_text(errors="replace").splitlines():
            level = _level(line)
            if level in ("error", "critical"):
                errors.append(f"node {node.index}: {line[:600]}")
            elif level == "warning":
                warnings.append(f"node {node.index}: {line[:300]}")
    return {"errors": len(errors), "error_lines": errors[:10], "warnings": len(warnings),
            "warning_lines": warnings[:5]}


@asynccontextmanager
async def running_cluster(size: int, database_url: str | None, plan: Plan) -> AsyncIterator[Cluster]:
    """``size`` nodes: the first alone (it migrates the new database), then the others together;
    every node is stopped with SIGTERM after (those still running), and its log read."""
    env = {"CORRAL_CLUSTER_SECRET": secrets.token_hex(16), "CORRAL_LEASE_TTL_S": str(plan.lease_ttl_s),
           "CORRAL_HEARTBEAT_S": str(plan.heartbeat_s)}
    cluster = Cluster(database_url)
    with tempfile.TemporaryDirectory(prefix="corral-bench-cluster-") as directory:
        root = Path(directory)
        try:
            cluster.nodes.append(await _start_node(0, root, database_url, env))
            cluster.nodes += await asyncio.gather(*(_start_node(i, root, database_url, env) for i in range(1, size)))
            yield cluster
        finally:
            await asyncio.gather(*(asyncio.to_thread(_stop, node) for node in cluster.nodes))
            cluster.findings = _read_logs(cluster.nodes)


async def create_agent(http: aiohttp.ClientSession, cluster: Cluster, name: str, *,
                       policy: dict[str, Any] | None = None, **provider_options: Any) -> None:
    """A demo agent created on the first node; waits until every node reports it ready."""
    body: dict[str, Any] = {"name": name, "provider": "demo", "provider_options": provider_options}
    if policy is not None:
        body["policy"] = policy
    async with http.post(f"{cluster.nodes[0].base}/v1/agents", json=body) as response:
        if response.status != 201:
            raise RuntimeError(f"POST /v1/agents: {response.status} {await response.text()}")
    deadline = time.monotonic() + 30
    for node in cluster.nodes:
        while True:
            async with http.get(f"{node.base}/v1/agents/{name}") as response:
                state = (await response.json()).get("state") if response.status == 200 else None
            if state == "ready":
                break
            if state == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"agent {name} is {state} on node {node.index}")
            await asyncio.sleep(0.05)


# --- throughput: the load generator -------------------------------------------------------------


@dataclass(frozen=True)
class ClusterLoad:
    """One generator's share: ``sessions`` sessions, the k-th created on node (first + k) mod N
    (so the shares together go round robin), each doing turns back to back."""

    nodes: tuple[tuple[str, str], ...]  # (node id, base URL)
    agent: str
    sessions: int
    first: int
    routing: str  # "owner": every write to the session's owner; "random": each to a random node
    warmup_s: float
    measure_s: float
    seed: int = 0


@dataclass
class ClusterTurns:
    cpu_s: float = 0.0
    # (POST sent, its 202, the run's terminal event, the owner's index, forwarded) per turn ending in the window
    spans: list[tuple[float, float, float, int, bool]] = field(default_factory=list)
    created_elsewhere: int = 0  # sessions whose creation named another owner than the node asked
    answered_elsewhere: int = 0  # 202s whose x-corral-node was not the session's owner


async def _window_cpu(window: tuple[float, float], into: list[float]) -> None:
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    into.append(time.process_time())
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    into.append(time.process_time())


async def cluster_worker(load: ClusterLoad, sync: Sync) -> ClusterTurns:
    rng = random.Random(load.seed)
    bases = [base for _, base in load.nodes]
    index_of = {node_id: index for index, (node_id, _) in enumerate(load.nodes)}
    result = ClusterTurns()
    async with client() as http:

        async def open_one(k: int) -> tuple[str, int, SessionStream]:
            home = (load.first + k) % len(bases)
            async with http.post(f"{bases[home]}/v1/sessions", json={"agent": load.agent}) as response:
                body = await response.json()
                if response.status != 201:
                    raise RuntimeError(f"POST /v1/sessions on node {home}: {response.status} {body}")
                owner = index_of.get(response.headers.get(NODE_HEADER, ""), home)
            result.created_elsewhere += owner != home
            stream = await http.get(f"{bases[owner]}/v1/sessions/{body['id']}/events")
            stream.raise_for_status()
            return str(body["id"]), owner, SessionStream(stream)

        opened = await asyncio.gather(*(open_one(k) for k in range(load.sessions)))
        start = await sync.ready()
        window = (start + load.warmup_s, start + load.warmup_s + load.measure_s)

        async def drive(session_id: str, owner: int, stream: SessionStream) -> None:
            count = 0
            while time.monotonic() < window[1]:
                target = owner if load.routing == "owner" else rng.randrange(len(bases))
                sent = time.monotonic()
                async with http.post(f"{bases[target]}/v1/sessions/{session_id}/messages",
                                     json={"content": f"hello {count}"}) as response:
                    text = await response.text()
                    answered = time.monotonic()
                    if response.status != 202:
                        raise RuntimeError(f"POST messages via node {target} (owner {owner}): {response.status} {text}")
                    if index_of.get(response.headers.get(NODE_HEADER, ""), owner) != owner:
                        result.answered_elsewhere += 1
                run_id = str(json.loads(text)["run_id"])
                ended = await stream.ended(run_id)
                stream.forget(run_id)
                count += 1
                if window[0] <= ended <= window[1]:
                    result.spans.append((sent, answered, ended, owner, target != owner))

        cpu: list[float] = []
        cpu_task = asyncio.create_task(_window_cpu(window, cpu))
        try:
            await asyncio.gather(*(drive(*each) for each in opened))
            await cpu_task
        finally:
            cpu_task.cancel()
            for _, _, stream in opened:
                await stream.aclose()
    result.cpu_s = cpu[1] - cpu[0] if len(cpu) == 2 else 0.0
    return result


async def one_config(backend: str, size: int, latency_ms: int, routing: str, plan: Plan) -> dict[str, Any]:
    async with _database(backend) as url, running_cluster(size, url, plan) as cluster:
        async with client() as http:
            await create_agent(http, cluster, "load", latency_ms=latency_ms, max_concurrent_calls=plan.limit)
        nodes = tuple((node.node_id, node.base) for node in cluster.nodes)
        counts = split(plan.sessions, plan.generators)
        shares = [ClusterLoad(nodes, "load", n, sum(counts[:i]), routing, plan.warmup_s, plan.measure_s, seed=i)
                  for i, n in enumerate(counts)]
        pids = [node.server.pid for node in cluster.nodes]
        database = url.rsplit("/", 1)[1] if url else None
        async with crew(cluster_worker, shares) as workers:
            await workers.go()
            await asyncio.sleep(plan.warmup_s)
            async with client() as http:
                connections, metrics = await _connections_opened(url), await _metrics(http, cluster)
                before = await asyncio.to_thread(snapshot, pids, database)
                await asyncio.sleep(plan.measure_s)
                cpu = cpu_between(before, await asyncio.to_thread(snapshot, pids, database))
                connections = await _connections_opened(url) - connections
                commits = _commits(metrics, await _metrics(http, cluster), cpu["seconds"])
            parts: list[ClusterTurns] = await workers.results()
    spans = [span for part in parts for span in part.spans]
    turns = len(spans)
    per_node = Counter(owner for *_, owner, _ in spans)
    node_cpu = cpu["nodes"]
    generators = sum(part.cpu_s for part in parts) / plan.measure_s
    direct = [answered - sent for sent, answered, _, _, forwarded in spans if not forwarded]
    forwarded = [answered - sent for sent, answered, _, _, was in spans if was]
    return {
        "backend": backend, "nodes": size, "latency_ms": latency_ms, "routing": routing,
        "sessions": plan.sessions, "limit": plan.limit, "turns": turns,
        "turns_per_s": turns / plan.measure_s,
        "latency": summary([ended - sent for sent, _, ended, _, _ in spans]),
        "post_direct": summary(direct) if direct else None,
        "post_forwarded": summary(forwarded) if forwarded else None,
        "forwarded_share": len(forwarded) / turns if turns else 0.0,
        "node_cpu": node_cpu,
        "node_turns_per_s": [per_node[i] / plan.measure_s for i in range(size)],
        "node_cpu_ms_per_owned_turn": [node_cpu[i] / per_node[i] * plan.measure_s * 1000 if per_node[i] else None
                                       for i in range(size)],
        "cpu_ms_per_turn": sum(node_cpu) / turns * plan.measure_s * 1000 if turns else None,
        "postgres_cpu": cpu["postgres"],
        "postgres_ms_per_turn": cpu["postgres"] / turns * plan.measure_s * 1000 if turns else None,
        "postgres_connections_per_s": connections / plan.measure_s,  # new connections to the database
        "commits": commits,  # per node: group commits/s, units per commit, ms per commit, forwarded requests/s
        "generator_cpu": generators,
        "machine_busy": cpu["machine_busy"],
        # what the machine did besides: this bench's parent, other people's work
        "other_cpu": cpu["machine_busy"] - sum(node_cpu) - cpu["postgres"] - generators,
        "created_elsewhere": sum(part.created_elsewhere for part in parts),
        "answered_elsewhere": sum(part.answered_elsewhere for part in parts),
        "logs": cluster.findings,
    }


METRICS = ("corral_commit_batch_units_count", "corral_commit_batch_units_sum", "corral_commit_seconds_sum",
           "corral_forwarded_requests_total")


async def _metrics(http: aiohttp.ClientSession, cluster: Cluster) -> list[dict[str, float]]:
    """Each node's group commits (count, units, seconds) and forwarded requests so far, from /metrics."""
    out = []
    for node in cluster.nodes:
        async with http.get(f"{node.base}/metrics") as response:
            text = await response.text()
        values = dict.fromkeys(METRICS, 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in values:
                values[name] += float(line.rsplit(" ", 1)[1])
        out.append(values)
    return out


def _commits(before: list[dict[str, float]], after: list[dict[str, float]], seconds: float) -> list[dict[str, float]]:
    out = []
    for b, a in zip(before, after, strict=True):
        delta = {name: a[name] - b[name] for name in METRICS}
        count = delta["corral_commit_batch_units_count"] or 1.0
        out.append({"commits_per_s": delta["corral_commit_batch_units_count"] / seconds,
                    "units_per_commit": delta["corral_commit_batch_units_sum"] / count,
                    "commit_ms": delta["corral_commit_seconds_sum"] / count * 1000,
                    "forwarded_per_s": delta["corral_forwarded_requests_total"] / seconds})
    return out


async def _connections_opened(url: str | None) -> int:
    """Connections ever opened to the database (``pg_stat_database.sessions``); 0 on SQLite."""
    if url is None:
        return 0
    db = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
    try:
        return int(await db.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await db.close()


@asynccontextmanager
async def _database(backend: str) -> AsyncIterator[str | None]:
    if backend == "sqlite":
        yield None
        return
    async with fresh_database() as url:
        yield url


def _configs(plan: Plan) -> list[tuple[str, int, int, str]]:
    out: list[tuple[str, int, int, str]] = []
    for latency in plan.latencies:
        if plan.sqlite:
            out.append(("sqlite", 1, latency, "owner"))
        for size in plan.nodes:
            for routing in plan.routings if size > 1 else ("owner",):
                out.append(("postgres", size, latency, routing))
    return out


# --- a forwarded POST's added latency --------------------------------------------------------------


async def forwarding(plan: Plan) -> dict[str, Any]:
    """One session on node 0 of an idle 2-node cluster, turns one at a time, each POST sent to
    the owner and to the other node in turn; the POST's time to its 202."""
    async with fresh_database() as url, running_cluster(2, url, plan) as cluster, client() as http:
        owner, other = cluster.nodes
        async with http.post(f"{owner.base}/v1/sessions", json={"agent": "assistant"}) as response:
            session_id = str((await response.json())["id"])
            named = response.headers.get(NODE_HEADER)
        response = await http.get(f"{owner.base}/v1/sessions/{session_id}/events")
        response.raise_for_status()
        stream = SessionStream(response)
        # What a node costs doing nothing (heartbeats, the takeover pass, the agents' sync...).
        pids = [owner.server.pid, other.server.pid]
        database = url.rsplit("/", 1)[1]
        await asyncio.sleep(1.0)
        before = await asyncio.to_thread(snapshot, pids, database)
        await asyncio.sleep(plan.idle_s)
        idle = cpu_between(before, await asyncio.to_thread(snapshot, pids, database))
        times: dict[str, list[float]] = {"owner": [], "forwarded": []}
        answered_by: Counter[str] = Counter()
        try:
            for index in range(2 * (plan.forward_samples + 5)):
                way, node = ("owner", owner) if index % 2 == 0 else ("forwarded", other)
                began = time.monotonic()
                async with http.post(f"{node.base}/v1/sessions/{session_id}/messages",
                                     json={"content": f"probe {index}"}) as answer:
                    body = await answer.json()
                    took = time.monotonic() - began
                    if answer.status != 202:
                        raise RuntimeError(f"POST messages ({way}): {answer.status} {body}")
                    answered_by[answer.headers.get(NODE_HEADER, "?")] += 1
                await stream.ended(str(body["run_id"]))
                stream.forget(str(body["run_id"]))
                if index >= 10:  # the first five each way warm the connections up
                    times[way].append(took)
                await asyncio.sleep(0.01)
        finally:
            await stream.aclose()
    direct, forwarded = summary(times["owner"]), summary(times["forwarded"])
    return {"owner": direct, "forwarded": forwarded, "added_p50_ms": forwarded["p50_ms"] - direct["p50_ms"],
            "added_p99_ms": forwarded["p99_ms"] - direct["p99_ms"], "owner_named_at_creation": named == owner.node_id,
            "answered_by_owner": answered_by[owner.node_id], "answered_by_other": answered_by[other.node_id],
            "idle_node_cpu": idle["nodes"], "idle_postgres_cpu": idle["postgres"], "idle_s": plan.idle_s,
            "logs": cluster.findings}


# --- takeover after kill -9 ----------------------------------------------------------------------------


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """The status and JSON body of a POST; (None, error) when no answer came."""
    try:
        async with http.post(url, json=body) as response:
            try:
                return response.status, await response.json()
            except (aiohttp.ContentTypeError, json.JSONDecodeError):
                return response.status, {"text": await response.text()}
    except aiohttp.ClientError as error:
        return None, {"error": repr(error)}


async def _gather_limited(coroutines: list[Any], limit: int = 32) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(coroutine: Any) -> Any:
        async with sem:
            return await coroutine

    return list(await asyncio.gather(*(one(c) for c in coroutines)))


async def takeover(plan: Plan) -> dict[str, Any]:
    from tests.cluster.checker import Accepted, check_history

    accepted: list[Accepted] = []

    async def accept(http: aiohttp.ClientSession, node: Node, session_id: str, content: str) -> str:
        status, body = await _post(http, f"{node.base}/v1/sessions/{session_id}/messages", {"content": content})
        if status != 202:
            raise RuntimeError(f"POST messages on node {node.index}: {status} {body}")
        accepted.append(Accepted(body["input_id"], body["run_id"], body["session_id"], body["disposition"]))
        return str(body["run_id"])

    async with fresh_database() as url, running_cluster(2, url, plan) as cluster, client() as http:
        victim, survivor = cluster.nodes
        db = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            await create_agent(http, cluster, "careful", policy={"approvals": {"wait": "ask"}})

            async def session(agent: str) -> str:
                status, body = await _post(http, f"{victim.base}/v1/sessions", {"agent": agent})
                if status != 201:
                    raise RuntimeError(f"POST /v1/sessions: {status} {body}")
                return str(body["id"])

            parked = await _gather_limited([session("careful") for _ in range(plan.parked_sessions)])
            sleeping = await _gather_limited([session("assistant") for _ in range(plan.sleeping_sessions)])
            park_runs = await _gather_limited([accept(http, victim, sid, PARK) for sid in parked])

            async def call_id(run_id: str) -> str:
                while True:
                    async with http.get(f"{victim.base}/v1/runs/{run_id}") as response:
                        pending = (await response.json()).get("pending_approvals") or []
                    if pending:
                        return str(pending[0]["call_id"])
                    await asyncio.sleep(0.05)

            calls = await asyncio.wait_for(_gather_limited([call_id(r) for r in park_runs]), 60)
            await _gather_limited([accept(http, victim, sid, f"queued {n}.{j}") for j in range(plan.queued_per_session)
                                   for n, sid in enumerate(parked)])
            await _gather_limited([accept(http, victim, sid, f"/sleep {plan.sleep_s:g}") for sid in sleeping])
            await _gather_limited([accept(http, victim, sid, f"behind {n}") for n, sid in enumerate(sleeping)])
            owned = await db.fetchval("SELECT count(*) FROM sessions WHERE node_id = $1", victim.node_id)
            mine = [*parked, *sleeping]
            running_at_kill = await db.fetchval("SELECT count(*) FROM runs WHERE session_id = ANY($1::text[]) "
                                                "AND status = 'running'", mine)
            unfinished_at_kill = await db.fetchval("SELECT count(*) FROM runs WHERE session_id = ANY($1::text[]) "
                                                   "AND status = ANY($2::text[])", mine, ACTIVE)

            killed = time.monotonic()
            victim.server.kill()
            marks: dict[str, float] = {}
            watching = asyncio.create_task(_watch(url, victim.node_id, survivor.node_id, mine, killed, marks))

            refused: Counter[str] = Counter()
            probe = 0
            while True:
                target = parked[probe % len(parked)]
                status, body = await _post(http, f"{survivor.base}/v1/sessions/{target}/messages",
                                           {"content": f"probe {probe}"})
                if status == 202:
                    first_202 = time.monotonic() - killed
                    accepted.append(Accepted(body["input_id"], body["run_id"], body["session_id"],
                                             body["disposition"]))
                    break
                refused[str(status)] += 1
                if time.monotonic() - killed > plan.lease_ttl_s + 60:
                    raise RuntimeError(f"no 202 from the survivor {time.monotonic() - killed:.0f} s after the kill: "
                                       f"{status} {body}")
                probe += 1
                await asyncio.sleep(0.1)

            decided_at = time.monotonic()
            retries = 0

            async def approve(run_id: str, call: str) -> None:
                nonlocal retries
                while True:
                    status, body = await _post(http, f"{survivor.base}/v1/runs/{run_id}/approvals/{call}",
                                               {"decision": "approve"})
                    if status == 202:
                        return
                    if status != 503 or time.monotonic() - decided_at > 60:
                        raise RuntimeError(f"approval of {run_id} via the survivor: {status} {body}")
                    retries += 1
                    await asyncio.sleep(0.1)

            await _gather_limited([approve(r, c) for r, c in zip(park_runs, calls, strict=True)])
            approvals_s = time.monotonic() - decided_at
            drained_at = await _until_done(db, parked, decided_at)  # the parked sessions' queues
            done_at = await _until_done(db, mine, decided_at)  # and the re-run model calls
            watching.cancel()
            with suppress(asyncio.CancelledError):
                await watching
            # Every run of the parked sessions ended after the approvals: none could before.
            drained = await db.fetchval("SELECT count(*) FROM runs WHERE session_id = ANY($1::text[]) "
                                        "AND status = 'completed'", parked)
            statuses = dict(await db.fetch("SELECT status, count(*) FROM runs WHERE session_id = ANY($1::text[]) "
                                           "GROUP BY status", mine))
        finally:
            await db.close()
        violations = await check_history(url, accepted, sessions=set(mine))
    drain_s = drained_at - decided_at
    return {
        "lease_ttl_s": plan.lease_ttl_s, "heartbeat_s": plan.heartbeat_s,
        "parked_sessions": plan.parked_sessions, "queued_per_session": plan.queued_per_session,
        "sleeping_sessions": plan.sleeping_sessions, "sleep_s": plan.sleep_s,
        "owned_at_kill": owned, "running_at_kill": running_at_kill, "unfinished_at_kill": unfinished_at_kill,
        "accepted": len(accepted), "first_202_s": first_202, "refused_before": dict(refused),
        "dead_s": marks.get("dead"), "all_adopted_s": marks.get("adopted"),
        "approvals_s": approvals_s, "approval_retries": retries,
        "drained_runs": drained, "drain_s": drain_s, "recovered_runs_per_s": drained / drain_s,
        "all_done_s": done_at - killed, "runs_by_status": statuses,
        "violations": violations[:20], "lost": sum(v.startswith("carried") for v in violations),
        "twice": sum(v.startswith("twice") for v in violations), "violation_count": len(violations),
        "logs": cluster.findings,
    }


async def _until_done(db: asyncpg.Connection, sessions: list[str], since: float, within: float = 300.0) -> float:
    """When no run of ``sessions`` is left unfinished (polled every 50 ms)."""
    while await db.fetchval("SELECT count(*) FROM runs WHERE session_id = ANY($1::text[]) "
                            "AND status = ANY($2::text[])", sessions, ACTIVE):
        if time.monotonic() - since > within:
            raise RuntimeError(f"the dead node's runs were not done {within:g} s after the approvals")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def _watch(url: str, victim: str, survivor: str, sessions: list[str], killed: float,
                 marks: dict[str, float]) -> None:
    """Record when the victim's row turns ``dead`` and when the survivor owns all its sessions
    (on a connection of its own: the scenario's is busy meanwhile)."""
    db = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
    try:
        while "dead" not in marks or "adopted" not in marks:
            now = time.monotonic() - killed
            if "dead" not in marks and await db.fetchval("SELECT state FROM nodes WHERE id = $1", victim) == "dead":
                marks["dead"] = now
            if "adopted" not in marks and not await db.fetchval(
                    "SELECT count(*) FROM sessions WHERE id = ANY($1::text[]) AND node_id IS DISTINCT FROM $2",
                    sessions, survivor):
                marks["adopted"] = now
            await asyncio.sleep(0.05)
    finally:
        await db.close()


# --- the scenario ----------------------------------------------------------------------------------------


async def run(plan: Plan) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    began = time.monotonic()
    configs = []
    for backend, size, latency, routing in _configs(plan):
        print(f"    {backend}, {size} node(s), L={latency} ms, writes to {routing}", flush=True)
        configs.append(await one_config(backend, size, latency, routing, plan))
    seconds["throughput"], began = time.monotonic() - began, time.monotonic()
    print("    forwarding", flush=True)
    forward = await forwarding(plan)
    seconds["forwarding"], began = time.monotonic() - began, time.monotonic()
    print("    takeover", flush=True)
    taken = await takeover(plan)
    seconds["takeover"] = time.monotonic() - began
    return {"plan": {"generators": plan.generators, "warmup_s": plan.warmup_s, "measure_s": plan.measure_s,
                     "sessions": plan.sessions, "limit": plan.limit, "lease_ttl_s": plan.lease_ttl_s,
                     "heartbeat_s": plan.heartbeat_s},
            "cpus": os.cpu_count(), "configs": configs, "forwarding": forward, "takeover": taken,
            "seconds": seconds}


# --- rows and the docs' tables ------------------------------------------------------------------------------

CPU_TARGET = 1.15  # CPU per turn at 3 nodes within 15% of 1 node
FORWARD_TARGET_MS = 2.0
TAKEOVER_SLACK_S = 2.0


def _base(results: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """The 1-node Postgres configuration at the same latency."""
    return next((c for c in results["configs"] if c["backend"] == "postgres" and c["nodes"] == 1
                 and c["latency_ms"] == config["latency_ms"]), None)


def _label(config: dict[str, Any]) -> str:
    if config["backend"] == "sqlite":
        return "1 node, SQLite"
    if config["nodes"] == 1:
        return "1 node, Postgres"
    return f"{config['nodes']} nodes, writes to {'the owner' if config['routing'] == 'owner' else 'a random node'}"


def _per_core(config: dict[str, Any]) -> float:
    """Turns/s per core the cluster used (its nodes and its Postgres): what more cores would add."""
    return float(config["turns_per_s"] / (sum(config["node_cpu"]) + config["postgres_cpu"]))


def _cpu_met(results: dict[str, Any], config: dict[str, Any]) -> bool | None:
    base = _base(results, config)
    if config["nodes"] != 3 or config["backend"] != "postgres" or base is None:
        return None
    return bool(config["cpu_ms_per_turn"] <= CPU_TARGET * base["cpu_ms_per_turn"])


def rows(results: dict[str, Any]) -> list[Row]:
    out = []
    for config in results["configs"]:
        base = _base(results, config)
        ratio = f" ({config['turns_per_s'] / base['turns_per_s']:.2f}x 1 Postgres node)" \
            if base and config is not base else ""
        cpu = " + ".join(f"{c:.2f}" for c in config["node_cpu"])
        text = (f"**{config['turns_per_s']:,.0f} turns/s**{ratio}; turn p50 {config['latency']['p50_ms']:.0f} ms; "
                f"CPU/turn {config['cpu_ms_per_turn']:.2f} ms + Postgres {config['postgres_ms_per_turn']:.2f} ms; "
                f"{_per_core(config):.0f} turns/s per core; Postgres connections opened "
                f"{config['postgres_connections_per_s']:.0f}/s; cores: nodes {cpu}, "
                f"Postgres {config['postgres_cpu']:.2f}, "
                f"generators {config['generator_cpu']:.2f}, other {config['other_cpu']:.2f} "
                f"(machine {config['machine_busy']:.2f} busy)")
        met = _cpu_met(results, config)
        target = f"CPU/turn ≤ {CPU_TARGET:.2f}x 1 node's ({base['cpu_ms_per_turn']:.2f} ms)" if met is not None \
            and base else ""
        out.append(Row(f"cluster: L={config['latency_ms']} ms, {_label(config)}", text, target, met))
    forward = results["forwarding"]
    out.append(Row("cluster: `POST .../messages` to a non-owner vs the owner, idle",
                   f"**+{forward['added_p50_ms']:.1f} ms p50**, +{forward['added_p99_ms']:.1f} ms p99 "
                   f"(owner p50 {forward['owner']['p50_ms']:.1f} / p99 {forward['owner']['p99_ms']:.1f} ms, forwarded "
                   f"{forward['forwarded']['p50_ms']:.1f} / {forward['forwarded']['p99_ms']:.1f} ms; "
                   f"{forward['owner']['n']} each); an idle node uses "
                   f"{' and '.join(f'{c:.3f}' for c in forward['idle_node_cpu'])} cores",
                   f"≤ {FORWARD_TARGET_MS:g} ms p50", forward["added_p50_ms"] <= FORWARD_TARGET_MS))
    taken = results["takeover"]
    limit = taken["lease_ttl_s"] + TAKEOVER_SLACK_S
    out.append(Row(f"cluster: kill -9 of a node owning {taken['owned_at_kill']} sessions "
                   f"({taken['unfinished_at_kill']} unfinished runs), lease_ttl_s={taken['lease_ttl_s']:g}",
                   f"**first 202 via the survivor after {taken['first_202_s']:.2f} s** (node marked dead after "
                   f"{_s(taken['dead_s'])}, all its sessions adopted after {_s(taken['all_adopted_s'])}); "
                   f"**{taken['recovered_runs_per_s']:,.0f} recovered runs/s** ({taken['drained_runs']} runs in "
                   f"{taken['drain_s']:.2f} s); {taken['lost']} lost, {taken['twice']} run twice",
                   f"≤ lease + {TAKEOVER_SLACK_S:g} s = {limit:g} s, 0 lost",
                   taken["first_202_s"] <= limit and taken["violation_count"] == 0))
    return out


def _s(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} s"


def markdown(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = [f"S=P={plan['sessions']} sessions doing turns back to back, {plan['generators']} generator processes, "
             f"{plan['warmup_s']:g} s warm-up and {plan['measure_s']:g} s measured per configuration, each on a new "
             f"database; lease_ttl_s={plan['lease_ttl_s']:g}, heartbeat_s={plan['heartbeat_s']:g}. The "
             f"{results['cpus']} cores are shared by every node, Postgres and the generators; CPU in cores over "
             "the measured window (other: this bench's parent and anything else on the machine):", "",
             "| L | configuration | turns/s | x 1 Postgres node | turn p50 / p99 | POST p50 direct / forwarded "
             "| CPU per turn: nodes + Postgres | turns/s per core | nodes | Postgres | generators | other "
             "| machine busy | Postgres connections opened/s | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config in results["configs"]:
        base = _base(results, config)
        ratio = f"{config['turns_per_s'] / base['turns_per_s']:.2f}" if base and base is not config else ""
        post = f"{config['post_direct']['p50_ms']:.1f}" if config["post_direct"] else "-"
        post += f" / {config['post_forwarded']['p50_ms']:.1f} ms" if config["post_forwarded"] else " ms"
        met = _cpu_met(results, config)
        verdict = "" if met is None else "met" if met else "**missed**"
        lines.append(
            f"| {config['latency_ms']} ms | {_label(config)} | **{config['turns_per_s']:,.0f}** | {ratio} | "
            f"{config['latency']['p50_ms']:.0f} / {config['latency']['p99_ms']:.0f} ms | {post} | "
            f"{config['cpu_ms_per_turn']:.2f} + {config['postgres_ms_per_turn']:.2f} ms | {_per_core(config):.0f} | "
            f"{' + '.join(f'{c:.2f}' for c in config['node_cpu'])} | {config['postgres_cpu']:.2f} | "
            f"{config['generator_cpu']:.2f} | {config['other_cpu']:.2f} | {config['machine_busy']:.2f} | "
            f"{config['postgres_connections_per_s']:.0f} | {verdict} |")
    lines += ["", "The 3-node rows' target: CPU per turn (the nodes') within 15% of one Postgres node's at the same L.",
              "", markdown_table([r for r in rows(results) if "L=" not in r.scenario])]
    parts = [*results["configs"], results["forwarding"], results["takeover"]]
    errors = [line for part in parts for line in part["logs"]["error_lines"]]
    count = sum(part["logs"]["errors"] for part in parts)
    lines += ["", f"Node logs: {count} lines at ERROR or above"
              + (": " + "; ".join(f"`{line[:200]}`" for line in errors[:3]) if errors else ".")]
    return "\n".join(lines)
