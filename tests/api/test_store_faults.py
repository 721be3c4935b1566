"""Over HTTP: a session whose write is being repaired answers 503 with Retry-After, never 500."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from corral.settings import Settings
from tests.faults import FlakyStore
from tests.helpers import sqlite_url, uvicorn_server

LIMIT = 30


async def test_a_session_held_by_a_failed_end_answers_503_then_goes_on(tmp_path: Path) -> None:
    store = FlakyStore(sqlite_url(tmp_path))
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT), uvicorn_server(settings, store) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            created = await http.post("/v1/sessions", json={"agent": "assistant"})
            session = created.json()["id"]
            store.fail("end_run")
            first = (await http.post(f"/v1/sessions/{session}/messages", json={"content": "hello"})).json()
            await store.refusing.wait()
            refused = await http.post(f"/v1/sessions/{session}/messages", json={"content": "again"})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.json()["error"]["type"] == "server_error"
            run = (await http.get(f"/v1/runs/{first['run_id']}")).json()
            assert run["status"] == "running"  # its end is not recorded yet
            store.heal("end_run")
            async with http.stream("GET", f"/v1/runs/{first['run_id']}/events") as stream:
                frames = [line async for line in stream.aiter_lines() if line.startswith("event:")]
            assert frames[-1] == "event: run.completed"  # streamed only once committed
            assert (await http.get(f"/v1/runs/{first['run_id']}")).json()["output"] == "echo: hello"
            accepted = await http.post(f"/v1/sessions/{session}/messages", json={"content": "again"})
            assert accepted.status_code == 202
