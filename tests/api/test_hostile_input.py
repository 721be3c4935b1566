"""Text and JSON that broke a session or a listing once (issue 18), on both backends.

A NUL is refused by Postgres alone and a lone surrogate by every UTF-8 writer; deep nesting
and non-finite numbers pass a JSON parser but not what comes after it. Each case here was a
500, a session stuck until restart, or a listing broken for everyone.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import asyncpg
import httpx

from corral.settings import Settings
from tests.helpers import assert_error, new_http_session, post, read_run, uvicorn_server

LIMIT = 60
JSON = {"content-type": "application/json"}


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=db_url, shutdown_grace_s=1.0)


async def _healthy(http: httpx.AsyncClient, session_id: str) -> None:
    """What one hostile request must never break: the listings and the session itself."""
    assert (await http.get("/v1/sessions")).status_code == 200
    assert (await http.get("/v1/runs")).status_code == 200
    accepted = await post(http, session_id, "still here?")
    frames = await read_run(http, accepted["run_id"])
    assert frames[-1].event == "run.completed"
    assert frames[-1].json["output"] == "echo: still here?"


async def test_a_nul_from_a_tool_is_stored_alike_and_the_session_goes_on(db_url: str, tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, db_url)) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            # Plain ASCII in the request; the tool's result holds a real U+0000.
            accepted = await post(http, session, '/tool echo {"text": "a\\u0000b"}')
            live = await read_run(http, accepted["run_id"])
            assert live[-1].event == "run.completed", live[-1]
            assert live[-1].json["output"] == "tool results: a\ufffdb"
            result = next(f for f in live if f.event == "tool.completed").json["result"]
            assert result == "a\ufffdb"
            replayed = await read_run(http, accepted["run_id"])  # from the store now
            assert [f.data for f in replayed] == [f.data for f in live]
            messages = (await http.get(f"/v1/sessions/{session}/messages")).json()
            assert "a\ufffdb" in [m["content"] for m in messages]
            await _healthy(http, session)


async def test_a_lone_surrogate_from_a_tool_is_replaced(db_url: str, tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, db_url)) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            accepted = await post(http, session, '/tool echo {"text": "x\\ud800y"}')
            frames = await read_run(http, accepted["run_id"])
            assert frames[-1].json["output"] == "tool results: x\ufffdy"
            run = await http.get(f"/v1/runs/{accepted['run_id']}")
            assert run.status_code == 200 and run.json()["output"] == "tool results: x\ufffdy"
            await _healthy(http, session)


async def test_a_user_message_with_a_nul_is_accepted_alike(db_url: str, tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, db_url)) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            accepted = await post(http, session, "hi\u0000there")
            frames = await read_run(http, accepted["run_id"])
            assert frames[-1].json["output"] == "echo: hi\ufffdthere"
            await _healthy(http, session)


async def test_bad_metadata_is_refused_and_nothing_is_stored(db_url: str, tmp_path: Path) -> None:
    deep: object = "x"
    for _ in range(900):
        deep = {"a": deep}
    bodies = [
        b'{"key": "k1", "metadata": {"\\ud800": "\\udc00x"}}',  # lone surrogates
        json.dumps({"key": "k1", "metadata": {"a": "x" * 20_000}}).encode(),  # too large
        json.dumps({"key": "k1", "metadata": {"a": [[[[[[[[[1]]]]]]]]]}}).encode(),  # nested 10 deep
        b'{"key": "k1", "metadata": ' + json.dumps(deep).encode() + b"}",  # nested 900 deep
    ]
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, db_url)) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            for body in bodies:
                assert_error(await http.post("/v1/sessions", content=body, headers=JSON), 422, "invalid_input")
            listing = await http.get("/v1/sessions")
            assert listing.status_code == 200 and listing.json() == []
            created = await http.post("/v1/sessions", json={"key": "k1", "metadata": {"fine": ["yes"]}})
            assert created.status_code == 201, created.text  # the key was never taken
            await _healthy(http, created.json()["id"])


async def test_rows_an_older_version_stored_read_back_clean(db_url: str, tmp_path: Path) -> None:
    """A database that already holds a lone surrogate in JSON (written before these checks)
    no longer breaks the listing."""
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, db_url)) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            await _write_behind_corrals_back(db_url, "UPDATE sessions SET metadata = $1 WHERE id = $2",
                                             '{"\\ud800": "\\udc00x"}', session)
            listing = await http.get("/v1/sessions")
            assert listing.status_code == 200, listing.text
            [row] = listing.json()
            assert row["metadata"] == {"\ufffd": "\ufffdx"}


async def _write_behind_corrals_back(db_url: str, statement: str, *args: str) -> None:
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
            conn.execute(statement.replace("$1", "?").replace("$2", "?"), args)
        return
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def test_malformed_and_hostile_bodies_answer_4xx_with_the_error_shape(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    async with asyncio.timeout(LIMIT), uvicorn_server(_settings(tmp_path, f"sqlite:///{tmp_path}/c.db")) as (
        base, _kernel, _server
    ):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            chat = "/v1/chat/completions"
            # OpenAI's clients expect 400 for any bad request on its endpoint.
            assert_error(await http.post(chat, content=deep, headers=JSON), 400)
            assert_error(await http.post(chat, content=b'{"model": "\xff"}', headers=JSON), 400)
            for path in ("/v1/sessions", f"/v1/sessions/{session}/messages", "/v1/jobs", "/v1/agents"):
                assert_error(await http.post(path, content=deep, headers=JSON), 422, "invalid_input")
                assert_error(await http.post(path, content=b'{"content": "\xff\xfe"}', headers=JSON),
                             400, "malformed_json")
                assert_error(await http.post(path, content=b'{"content": NaN}', headers=JSON), 400, "malformed_json")
                assert_error(await http.post(path, content=b'{"content": 1e999}', headers=JSON), 400, "malformed_json")
                assert_error(await http.post(path, content=b'{"content": ' + b"9" * 5000 + b"}", headers=JSON),
                             400, "malformed_json")
            await _healthy(http, session)
