"""``corral serve --workers N`` on Postgres: a supervisor and N worker nodes sharing one port
(cli/workers.py).

The process tests start a real supervisor on a fresh Postgres database and a free loopback port,
and reach it with fresh connections (no keep-alive), so that the kernel spreads them over the
workers' sockets; the rest check the pieces in this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from corral.cli.serve import TagLines, check_workers
from corral.cli.workers import (
    CannotListen,
    claim_port,
    describe,
    listener,
    settings_blob,
    settings_from_blob,
    worker_url,
)
from corral.errors import InvalidInput
from corral.settings import Settings
from corral.specs import AgentSpec
from tests.cluster.harness import fresh_database
from tests.helpers import alive, clean_env, free_port

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"  # never connected to by the tests that use it
TOKEN = "admin-token-0123456789"
SECRET = "cluster-secret-0123456789"
STOPPED_WITHIN_S = 15.0  # an idle worker stops in about a second; the supervisor's own bound is 15 s


# --- the pieces -------------------------------------------------------------------------------


def test_check_workers_on_postgres(tmp_path: Path) -> None:
    postgres = {"data_dir": tmp_path, "database_url": PG_URL, "workers": 4}
    check_workers(Settings(**postgres))
    check_workers(Settings(**postgres, advertise_url="http://10.0.0.5:8787"))
    check_workers(Settings(**postgres, advertise_url="http://node-a.internal"))
    for url in ("https://10.0.0.5:8787", "http://10.0.0.5:8787/corral"):
        with pytest.raises(InvalidInput, match=r"refusing 4 workers \(--workers, CORRAL_WORKERS\) with this "
                           r"advertise_url: .*http://HOST:PORT"):
            check_workers(Settings(**postgres, advertise_url=url))
        check_workers(Settings(**{**postgres, "workers": 1}, advertise_url=url))  # one process: any URL
    with pytest.raises(InvalidInput, match="one process only"):
        check_workers(Settings(data_dir=tmp_path, workers=2))


def test_each_worker_advertises_its_private_port() -> None:
    with listener("127.0.0.1", 0, shared=False) as private:
        port = private.getsockname()[1]
        assert worker_url(Settings(), private) == f"http://127.0.0.1:{port}"
        # advertise_url names the machine: its host, with the worker's own port.
        assert worker_url(Settings(advertise_url="http://10.0.0.5:8787"), private) == f"http://10.0.0.5:{port}"
        assert worker_url(Settings(advertise_url="http://[fd00::5]:8787"), private) == f"http://[fd00::5]:{port}"
    with listener("localhost", 0, shared=False) as private:  # bound as uvicorn binds it: IPv4
        assert worker_url(Settings(host="localhost"), private) == f"http://127.0.0.1:{private.getsockname()[1]}"
    if socket.has_ipv6:
        try:
            private6 = listener("::1", 0, shared=False)
        except OSError:  # no IPv6 loopback here
            return
        with private6:
            assert worker_url(Settings(host="::1"), private6) == f"http://[::1]:{private6.getsockname()[1]}"


def test_the_settings_reach_a_worker_unchanged_secrets_included(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=PG_URL, api_token=TOKEN, cluster_secret=SECRET, workers=3,
        principals=[{"name": "alice", "token": "alice-token-0123456789"}], cors_origins=["http://x.test"],
        agents=[AgentSpec(name="slow", provider_options={"latency_ms": 200}, policy={"approvals": {"wait": "ask"}})],
        lease_ttl_s=6, heartbeat_s=2.5, log_format="json",
    )
    blob = settings_blob(settings)
    assert blob.endswith(b"\n") and blob.count(b"\n") == 1  # one line
    back = settings_from_blob(blob)
    assert back.model_dump() == settings.model_dump()
    assert back.api_token == SecretStr(TOKEN) and back.cluster_secret == SecretStr(SECRET)
    assert back.principals[0].token.get_secret_value() == "alice-token-0123456789"
    # A worker's own values replace the supervisor's; nothing else changes.
    mine = settings_from_blob(settings_blob(settings, advertise_url="http://127.0.0.1:41000", workers=1, port=9000))
    assert (mine.advertise_url, mine.workers, mine.port) == ("http://127.0.0.1:41000", 1, 9000)
    assert mine.model_dump(exclude={"advertise_url", "workers", "port"}) == \
        settings.model_dump(exclude={"advertise_url", "workers", "port"})


def test_the_settings_a_worker_gets_ignore_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "MAX_PENDING_INPUTS", "CONFIG"):
        monkeypatch.delenv(f"CORRAL_{name}", raising=False)
    blob = settings_blob(Settings(port=5678))
    monkeypatch.setenv("CORRAL_PORT", "1234")
    monkeypatch.setenv("CORRAL_MAX_PENDING_INPUTS", "7")
    back = settings_from_blob(blob)
    assert (back.port, back.max_pending_inputs) == (5678, 1000)


def test_a_worker_tags_its_lines() -> None:
    record = logging.LogRecord("corral.x", logging.INFO, __file__, 1, "took %d ms for %s", (5, "ses_1"), None)
    assert TagLines("worker 2").filter(record)
    assert record.getMessage() == "[worker 2] took 5 ms for ses_1"
    broken = logging.LogRecord("corral.x", logging.INFO, __file__, 1, "%d", ("x",), None)
    assert TagLines("worker 2").filter(broken) and broken.msg == "%d"  # left for the handler to report


def test_the_port_is_claimed_once_and_refused_while_anyone_listens() -> None:
    port = claim_port("127.0.0.1", 0)
    assert port > 0
    assert claim_port("127.0.0.1", port) == port  # the probe keeps nothing
    # Two workers' shared sockets on one port (what a running supervisor leaves listening)...
    with listener("127.0.0.1", port, shared=True) as first, listener("127.0.0.1", port, shared=True):
        assert first.getsockname()[1] == port
        # ... and a second supervisor is refused, although its own sockets could have joined them.
        with pytest.raises(CannotListen, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            claim_port("127.0.0.1", port)
    with socket.socket() as plain:  # one `corral serve`, as uvicorn binds it
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(CannotListen):
            claim_port("127.0.0.1", plain.getsockname()[1])


def test_exit_statuses_read_well() -> None:
    assert (describe(0), describe(3), describe(-9), describe(None)) == (
        "status 0", "status 3", "signal SIGKILL", "no process")


# --- real processes ---------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``."""
    found: set[int] = set()
    with suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(FileNotFoundError):
                found.update(int(child) for child in (task / "children").read_text().split())
    return {child for child in found if alive(child)}


@dataclass
class Supervisor:
    proc: asyncio.subprocess.Process
    base: str
    log_path: Path
    seen: set[int] = field(default_factory=set)  # every worker pid ever seen, for the clean-up

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no output)"

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def workers(self) -> set[int]:
        """The running workers' pids."""
        workers = children(self.proc.pid)
        self.seen |= workers
        return workers

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the supervisor and wait for it, at most ``STOPPED_WITHIN_S``; its exit status."""
        self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(STOPPED_WITHIN_S):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"the supervisor did not stop within {STOPPED_WITHIN_S} s:\n{self.tail()}") from None


def fresh() -> httpx.AsyncClient:
    """A client that opens a new connection for every request: the kernel picks a worker for each."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_keepalive_connections=0))


@asynccontextmanager
async def supervisor(tmp_path: Path, database_url: str, *args: str, **env: str) -> AsyncIterator[Supervisor]:
    """``corral serve --workers 2`` on a free port (its output in ``tmp_path/serve.log``), not waited
    for; at the end the supervisor and every worker it started are killed if still there."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral", "serve", "--workers", "2", "--port", str(port),
            "--database-url", database_url, "--data-dir", str(tmp_path / "data"), *args,
            env=clean_env(**{"CORRAL_LOG_LEVEL": "info", **env}), cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    server = Supervisor(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        yield server
    finally:
        server.workers()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in server.seen:  # each worker leads a process group of its own
            if alive(pid, command="corral"):
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


async def live_nodes(http: httpx.AsyncClient, base: str) -> list[dict[str, Any]]:
    response = await http.get(f"{base}/v1/cluster")  # no token on loopback: the local admin
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "cluster", body
    return [node for node in body["nodes"] if node["state"] == "live" and node["heartbeat_age_s"] < 5]


async def until_live(http: httpx.AsyncClient, server: Supervisor, count: int) -> list[dict[str, Any]]:
    """Poll ``GET /v1/cluster`` on the shared port until ``count`` live nodes answer ``/healthz``
    at their own URL; the caller's timeout bounds it."""
    while True:
        assert server.proc.returncode is None, f"the supervisor exited ({server.proc.returncode}):\n{server.tail()}"
        with suppress(httpx.TransportError):
            nodes = await live_nodes(http, server.base)
            if len(nodes) == count:
                answers = [await http.get(f"{node['url']}/healthz") for node in nodes]
                if all(answer.status_code == 200 for answer in answers):
                    return nodes
        await asyncio.sleep(0.1)


async def node_ids_seen(http: httpx.AsyncClient, base: str, want: set[str], most: int = 200) -> set[str]:
    """``x-corral-node`` of ``GET /healthz`` on the shared port, each on a new connection, until all
    of ``want`` answered (or ``most`` requests)."""
    seen: set[str] = set()
    for _ in range(most):
        response = await http.get(f"{base}/healthz")
        assert response.status_code == 200, response.text
        seen.add(response.headers["x-corral-node"])
        if want <= seen:
            break
    return seen


def forwarded(exposition: str) -> int:
    match = re.search(r'^corral_forwarded_requests_total\{outcome="sent"\} (\S+)$', exposition, re.M)
    return int(float(match.group(1))) if match else 0


async def messages_complete(http: httpx.AsyncClient, base: str, count: int) -> str:
    """A session created through the shared port, ``count`` messages sent to it each on a new
    connection (so some reach the worker that does not own it, and are forwarded), and every run
    they started completed. The session's id."""
    response = await http.post(f"{base}/v1/sessions", json={"agent": "assistant"})
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    run_ids = []
    for n in range(count):
        response = await http.post(f"{base}/v1/sessions/{session_id}/messages", json={"content": f"m{n}"})
        assert response.status_code == 202, response.text
        run_ids.append(response.json()["run_id"])
    for run_id in run_ids:
        while True:
            response = await http.get(f"{base}/v1/runs/{run_id}")
            assert response.status_code == 200, response.text
            status = response.json()["status"]
            if status not in ("queued", "running", "waiting"):
                assert status == "completed", response.json()
                break
            await asyncio.sleep(0.05)
    return str(session_id)


async def test_two_workers_share_the_port_forward_to_each_other_restart_and_stop(tmp_path: Path) -> None:
    async with asyncio.timeout(90), fresh_database() as url, supervisor(tmp_path, url) as server, \
            fresh() as http:
        nodes = await until_live(http, server, 2)
        urls = {node["url"] for node in nodes}
        assert len(urls) == 2 and server.base not in urls, nodes  # each worker at its own address
        workers = server.workers()
        assert len(workers) == 2, workers

        # Connections to the shared port reach both workers.
        ids = {node["id"] for node in nodes}
        assert await node_ids_seen(http, server.base, ids) == ids

        # A session's messages sent through the shared port all run: those that reached the
        # worker that does not own the session were forwarded to the one that does.
        await messages_complete(http, server.base, 16)
        total = 0
        for node in nodes:
            response = await http.get(f"{node['url']}/metrics")
            assert response.status_code == 200
            total += forwarded(response.text)
        assert total > 0, "no message was forwarded"

        # A worker killed is started again, as a new node; the other one serves meanwhile.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        replaced = await until_new_node(http, server, ids)
        assert replaced["url"] not in urls, replaced
        assert victim not in server.workers() and len(server.workers()) == 2
        assert re.search(rf"worker \d \(pid {victim}, node http://127\.0\.0\.1:\d+\) exited unexpectedly with signal "
                         r"SIGKILL after [\d.]+ s; starting it again in 0\.5 s", server.log), server.tail()
        await messages_complete(http, server.base, 4)

        # SIGTERM: every worker stops, then the supervisor.
        workers = server.workers()
        assert len(workers) == 2
        started = time.monotonic()
        assert await server.stop() == 0, server.tail()
        for pid in workers:
            assert not alive(pid), f"worker {pid} outlived its supervisor"
        assert time.monotonic() - started < STOPPED_WITHIN_S

    log = server.log
    assert f"serving {server.base} with 2 workers" in log
    assert '"[worker 1] ' in log and '"[worker 2] ' in log  # each worker's lines say which it is
    assert "SIGTERM: stopping 2 workers" in log


async def until_new_node(http: httpx.AsyncClient, server: Supervisor, old: set[str]) -> dict[str, Any]:
    """The live node that is none of ``old`` (a restarted worker), once it answers at its own URL."""
    while True:
        assert server.proc.returncode is None, server.tail()
        with suppress(httpx.TransportError):
            for node in await live_nodes(http, server.base):
                if node["id"] not in old and (await http.get(f"{node['url']}/healthz")).status_code == 200:
                    return node
        await asyncio.sleep(0.1)


async def test_no_worker_outlives_a_killed_supervisor(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, supervisor(tmp_path, url) as server, fresh() as http:
        await until_live(http, server, 2)
        workers = server.workers()
        assert len(workers) == 2
        server.proc.kill()  # nothing passes a signal on: each worker sees its control channel end
        await server.proc.wait()
        deadline = time.monotonic() + STOPPED_WITHIN_S
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers outlived their supervisor:\n{server.tail()}"
            await asyncio.sleep(0.05)
        assert "left the cluster" in server.log  # they stopped as on SIGTERM, not killed


async def test_a_worker_that_cannot_start_stops_everything_with_status_1(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url:
        missing = url.rsplit("/", 1)[0] + "/corral_no_such_database"
        async with supervisor(tmp_path, missing) as server:
            async with asyncio.timeout(STOPPED_WITHIN_S + 20):
                assert await server.proc.wait() == 1, server.tail()
            assert not server.workers()
    assert re.search(r"worker \d exited with status \d+ before it served", server.log), server.tail()


async def test_a_port_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with asyncio.timeout(30):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral", "serve", "--workers", "2", "--port", str(port),
                "--database-url", PG_URL, "--data-dir", str(tmp_path), env=clean_env(CORRAL_LOG_LEVEL="warning"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, stderr = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    message = stderr.decode()
    assert proc.returncode == 2, message
    assert message == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n", message
