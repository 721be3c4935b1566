"""A full disk (issue 18): a restart on a store that refuses writes starts, serves reads, answers
writes 503 with Retry-After, says so on ``/readyz`` and ``/healthz``, and goes on by itself once
the store takes writes again, finishing the start-up work it had to leave (a run left running
is recovered).

The real thing on SQLite: ``corral serve`` started with ``RLIMIT_FSIZE`` at the size its
write-ahead log already has, so SQLite's first new frame fails with EFBIG ("disk I/O error"),
exactly what a full disk does to it; lifting the limit is space coming back. In process, on
SQLite and Postgres: ``FlakyStore.fill_disk`` makes every commit of the writer fail as a full
disk's would.
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from corral import __version__
from corral.kernel import readiness
from corral.settings import Settings
from corral.types import RunStatus
from tests.faults import FlakyStore
from tests.helpers import client, corral_serve, sqlite_url, uvicorn_server
from tests.kernel.test_recovery import SessionSeed, seed

LIMIT = 90.0
DEADLINE_S = 30.0
# SQLite's shared-memory index of the log: always this big for a small log, and made before
# any read, so a limit below it would refuse reads too, not only writes.
SHM_SIZE = 32768


async def poll(http: httpx.AsyncClient, path: str, check: Any, *, within: float = DEADLINE_S) -> httpx.Response:
    """GET ``path`` until ``check(response)`` holds, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        response = await http.get(path)
        if check(response):
            return response
        assert time.monotonic() < deadline, f"GET {path}: still {response.status_code} {response.text}"
        await asyncio.sleep(0.05)


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "store_unavailable"


async def test_a_restart_on_a_full_disk_serves_reads_refuses_writes_and_recovers_when_space_returns(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with asyncio.timeout(LIMIT):
        # A first life: sessions, a finished turn, and a run cut off by kill -9 mid-flight.
        async with corral_serve(data) as first, client(first.base) as http:
            sessions = [(await http.post("/v1/sessions", json={"agent": "assistant"})).json()["id"]
                        for _ in range(5)]
            done = (await http.post(f"/v1/sessions/{sessions[0]}/messages", json={"content": "before"})).json()
            await poll(http, f"/v1/runs/{done['run_id']}", lambda r: r.json()["status"] == "completed")
            cut = (await http.post(f"/v1/sessions/{sessions[1]}/messages", json={"content": "/sleep 1"})).json()
            await poll(http, f"/v1/runs/{cut['run_id']}", lambda r: r.json()["status"] == "running")
            first.proc.kill()
            await first.proc.wait()

        # The disk is full: no file may grow. The log's next frame goes at its end, so that is the limit.
        files = {path.name: path.stat().st_size for path in data.iterdir()}
        wal = files["corral.db-wal"]
        assert wal > SHM_SIZE and files["corral.db"] <= wal and files["corral.db-shm"] <= wal, files
        async with corral_serve(data, file_size_limit=wal) as server, client(server.base) as http:
            # Reads are served.
            listed = await http.get("/v1/sessions")
            assert listed.status_code == 200
            assert {s["id"] for s in listed.json()} >= set(sessions)
            assert (await http.get("/v1/runs")).status_code == 200
            assert (await http.get(f"/v1/runs/{done['run_id']}")).json()["output"] == "echo: before"
            assert (await http.get("/")).status_code == 200
            # The run cut off is not recovered yet: its interruption is a write.
            assert (await http.get(f"/v1/runs/{cut['run_id']}")).json()["status"] == "running"

            # Writes are refused, and told to come back.
            refused = await http.post(f"/v1/sessions/{sessions[2]}/messages", json={"content": "while full"})
            assert_store_unavailable(refused)
            assert_store_unavailable(await http.post(f"/v1/sessions/{sessions[1]}/messages", json={"content": "x"}))
            assert_store_unavailable(await http.post("/v1/sessions", json={"agent": "assistant"}))

            # Not ready, and why; alive all the same.
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "not_ready"
            reasons = " ".join(ready.json()["reasons"])
            assert "store" in reasons and "disk I/O error" in reasons, reasons
            assert "start-up" in reasons, reasons  # the recovery of the cut-off run waits
            assert str(data) not in ready.text and "sqlite://" not in ready.text, ready.text  # no URL, no path
            health = await http.get("/healthz")
            assert health.status_code == 200
            assert health.json()["store"] == "unwritable" and health.json()["ready"] is False
            assert (data / "corral.db-wal").stat().st_size == wal  # nothing got in

            # Space returns: no restart needed.
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            ready = await poll(http, "/readyz", lambda r: r.status_code == 200)
            assert ready.json()["status"] == "ready" and ready.json()["reasons"] == []
            assert (await http.get("/healthz")).json()["store"] == "ok"

            # The deferred recovery happened: the cut-off run is interrupted, its input runs again.
            interrupted = await poll(http, f"/v1/runs/{cut['run_id']}",
                                     lambda r: r.json()["status"] == "interrupted")
            assert interrupted.json()["error"]["code"] == "interrupted"
            runs = (await http.get("/v1/runs", params={"session_id": sessions[1]})).json()["runs"]
            requeued = [run for run in runs if run["id"] != cut["run_id"]]
            assert len(requeued) == 1
            await poll(http, f"/v1/runs/{requeued[0]['id']}", lambda r: r.json()["status"] == "completed")

            # The same POST is accepted now, and runs.
            accepted = await http.post(f"/v1/sessions/{sessions[2]}/messages", json={"content": "while full"})
            assert accepted.status_code == 202, accepted.text
            finished = await poll(http, f"/v1/runs/{accepted.json()['run_id']}",
                                  lambda r: r.json()["status"] == "completed")
            assert finished.json()["output"] == "echo: while full"
            # Nothing accepted before was lost.
            assert (await http.get(f"/v1/runs/{done['run_id']}")).json()["output"] == "echo: before"
            created = await http.post("/v1/sessions", json={"agent": "assistant"})
            assert created.status_code == 201


async def test_a_start_on_a_store_that_refuses_writes_serves_reads_and_finishes_the_start_later(
        db_url: str, tmp_path: Path) -> None:
    """In process, on SQLite and on Postgres (a cluster's node, whose join is a write too)."""
    settings = Settings(data_dir=tmp_path, database_url=db_url, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT):
        async with uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
            session = (await http.post("/v1/sessions", json={"agent": "assistant"})).json()["id"]
            done = (await http.post(f"/v1/sessions/{session}/messages", json={"content": "before"})).json()
            await poll(http, f"/v1/runs/{done['run_id']}", lambda r: r.json()["status"] == "completed")
        crash = SessionSeed()  # and a crash left a run running
        cut = crash.run(RunStatus.RUNNING, 1.0, "cut off")
        await seed(db_url, crash)

        store = FlakyStore(db_url)
        store.fill_disk()
        async with uvicorn_server(settings, store) as (base, kernel, _server), client(base) as http:
            assert {s["id"] for s in (await http.get("/v1/sessions")).json()} >= {session, crash.id}
            assert (await http.get(f"/v1/runs/{done['run_id']}")).json()["output"] == "echo: before"
            assert (await http.get(f"/v1/runs/{cut.id}")).json()["status"] == "running"
            assert (await http.get("/")).status_code == 200
            assert_store_unavailable(await http.post(f"/v1/sessions/{session}/messages", json={"content": "full"}))
            assert_store_unavailable(await http.post("/v1/sessions", json={"agent": "assistant"}))
            job = {"agent": "assistant", "schedule": {"every_s": 3600}, "message": "hourly"}
            assert_store_unavailable(await http.post("/v1/jobs", json=job))
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and int(ready.headers["retry-after"]) >= 1
            assert ready.json()["status"] == "not_ready" and ready.json()["store"] == "unwritable"
            assert any("database or disk is full" in reason for reason in ready.json()["reasons"]), ready.text
            if kernel.ownership is not None:  # a cluster's node: its join waits, and holds every write
                assert any("cluster join" in reason for reason in ready.json()["reasons"]), ready.text
            url = make_url(db_url)
            assert not [part for part in (url.host, url.database, "://") if part and part in ready.text]  # no URL
            health = await http.get("/healthz")
            assert health.status_code == 200
            assert health.json()["status"] == "ok" and health.json()["store"] == "unwritable"
            metrics = (await http.get("/metrics")).text
            assert "corral_store_writable 0.0" in metrics and "corral_ready 0.0" in metrics

            store.free_disk()
            ready = await poll(http, "/readyz", lambda r: r.status_code == 200)
            assert ready.json() == {"status": "ready", "reasons": [], "store": "ok", "version": ready.json()["version"]}
            assert (await http.get("/healthz")).json()["store"] == "ok"
            # The run the crash left running is recovered (on Postgres, when the node adopts its session).
            await poll(http, f"/v1/runs/{cut.id}", lambda r: r.json()["status"] == "interrupted")
            runs = (await http.get("/v1/runs", params={"session_id": crash.id})).json()["runs"]
            (requeued,) = [run for run in runs if run["id"] != cut.id]
            finished = await poll(http, f"/v1/runs/{requeued['id']}", lambda r: r.json()["status"] == "completed")
            assert finished.json()["output"] == "echo: cut off"
            accepted = await http.post(f"/v1/sessions/{session}/messages", json={"content": "full"})
            assert accepted.status_code == 202, accepted.text
            finished = await poll(http, f"/v1/runs/{accepted.json()['run_id']}",
                                  lambda r: r.json()["status"] == "completed")
            assert finished.json()["output"] == "echo: full"
            assert "corral_store_writable 1.0" in (await http.get("/metrics")).text
            assert (await http.post("/v1/jobs", json=job)).status_code == 201


async def test_a_stop_while_start_up_work_waits_for_the_store_is_bounded(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    crash = SessionSeed()
    crash.run(RunStatus.RUNNING, 1.0, "cut off")
    await seed(url, crash)
    store = FlakyStore(url)
    store.fill_disk()
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT):
        async with uvicorn_server(settings, store) as (base, kernel, _server), client(base) as http:
            assert kernel.readiness.pending == {"session recovery": 1, "agent creation": 1}  # a new database
            kernel.begin_stop()
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reasons"][0].startswith("stopping")
            assert (await http.get("/healthz")).json()["status"] == "stopping"
            began = time.monotonic()
        assert time.monotonic() - began < 5.0  # the deferred recovery is dropped, not waited for
        assert not kernel.readiness.pending


async def test_an_idle_node_whose_disk_fills_up_says_so_at_the_next_readiness_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No client writes, yet ``/readyz`` finds out (its own probe when the last write is old), and
    the store watch finds out when space returns. Open like ``/healthz``: no token needed."""
    monkeypatch.setattr(readiness, "FRESH_S", 0.0)  # every check probes: no waiting for the store to age
    store = FlakyStore(sqlite_url(tmp_path))
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0, api_token="s3cret")
    async with asyncio.timeout(LIMIT), uvicorn_server(settings, store) as (base, _kernel, _server):
        async with client(base) as anonymous:
            assert (await anonymous.get("/readyz")).json() == {"status": "ready", "reasons": [], "store": "ok",
                                                               "version": __version__}
            store.fill_disk()
            ready = await anonymous.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["reasons"] == ["store: writes fail: [Errno 28] database or disk is full"]
            assert (await anonymous.get("/healthz")).json()["store"] == "unwritable"
            monkeypatch.setattr(readiness, "FRESH_S", 3600.0)  # from here on only the store watch probes
            store.free_disk()
            await poll(anonymous, "/readyz", lambda r: r.status_code == 200)
