"""The REST API over real HTTP: agents, sessions, messages, runs, cancel, approvals, auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.api import create_app
from corral.cli.serve import check_exposure
from corral.errors import InvalidInput
from corral.settings import Settings
from tests.helpers import (
    TERMINAL_EVENTS,
    assert_error,
    client,
    create_agent,
    http_server,
    new_http_session,
    post,
    read_run,
    sse_frames,
    until_event,
)

LONG_WAIT = '/tool wait {"ms": 60000}'


def iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None, f"not an aware timestamp: {value}"
    return parsed


async def hard_cancel(http: httpx.AsyncClient, run_id: str) -> None:
    """Hard-cancel a LONG_WAIT run once it is inside its tool call, and wait for the end."""
    async with http.stream("GET", f"/v1/runs/{run_id}/events") as response:
        frames = sse_frames(response)
        await until_event(frames, "tool.started")
        cancelled = await http.post(f"/v1/runs/{run_id}/cancel", json={"mode": "hard"})
        assert cancelled.status_code == 202, cancelled.text
        assert (await until_event(frames, *TERMINAL_EVENTS)).event == "run.cancelled"


async def runs_of(http: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await http.get("/v1/runs", params={"session_id": session_id})
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


# --- agents ------------------------------------------------------------------------------


async def test_agents_crud(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        created = await http.post("/v1/agents", json={
            "name": "slow", "provider": "demo", "provider_options": {"startup_ms": 300},
            "system_prompt": "be slow",
        })
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["state"] == "starting"  # at once, whatever the driver's start time
        assert body["name"] == "slow" and body["provider"] == "demo" and body["error"] is None
        assert body["tools"] == ["wait", "echo"] and body["system_prompt"] == "be slow"
        assert isinstance(body["generation"], int)
        iso(body["created_at"])

        fast = await http.post("/v1/agents", json={"name": "fast", "provider": "demo", "tools": ["echo"]})
        assert fast.status_code == 201
        assert fast.json()["state"] in {"starting", "ready"}

        assert_error(await http.post("/v1/agents", json={"name": "slow", "provider": "demo"}), 409, "conflict")

        # A message for a starting agent waits in its lane and runs once the agent is ready.
        sid = await new_http_session(http, "slow")
        accepted = await post(http, sid, "hello")
        assert (await read_run(http, accepted["run_id"]))[-1].json["output"] == "echo: hello"
        assert (await http.get("/v1/agents/slow")).json()["state"] == "ready"

        names = [a["name"] for a in (await http.get("/v1/agents")).json()]
        assert {"assistant", "slow", "fast"} <= set(names)
        assistant = (await http.get("/v1/agents/assistant")).json()
        assert assistant["state"] == "ready" and assistant["provider"] == "demo"

        assert_error(await http.get("/v1/agents/nobody"), 404, "not_found")
        deleted = await http.delete("/v1/agents/fast")
        assert deleted.status_code == 204 and deleted.content == b""
        assert_error(await http.get("/v1/agents/fast"), 404, "not_found")
        assert_error(await http.delete("/v1/agents/fast"), 404, "not_found")
        assert "fast" not in [a["name"] for a in (await http.get("/v1/agents")).json()]
        again = await http.post("/v1/agents", json={"name": "fast", "provider": "demo"})
        assert again.status_code == 201
        assert again.json()["generation"] > fast.json()["generation"]


async def test_concurrent_creations_of_one_agent_name_yield_one_agent(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        responses = await asyncio.gather(*(
            http.post("/v1/agents", json={"name": "racer", "provider": "demo"}) for _ in range(8)
        ))
        assert sorted(r.status_code for r in responses) == [201] + [409] * 7
        assert [a["name"] for a in (await http.get("/v1/agents")).json()].count("racer") == 1


@pytest.mark.parametrize(
    ("spec", "status"),
    [
        ({"name": "x", "provider": "nope"}, 400),
        ({"name": "x", "provider": "demo", "tools": ["wait", "nope"]}, 400),
        ({"name": "x", "provider": "demo", "provider_options": {"latency_ms": -1}}, 400),
        ({"name": "x", "provider": "demo", "provider_options": {"colour": "red"}}, 400),
        ({"name": "bad name!", "provider": "demo"}, 422),
        ({"name": "", "provider": "demo"}, 422),
        ({"name": "-dash", "provider": "demo"}, 422),
        ({"name": "x" * 65, "provider": "demo"}, 422),
        ({"provider": "demo"}, 422),
        ({"name": "x", "provider": "demo", "max_steps": 0}, 422),
        ({"name": "x", "provider": "demo", "policy": {"approvals": {"echo": "maybe"}}}, 422),
        ({"name": "x", "provider": "demo", "surprise": True}, 422),
    ],
)
async def test_bad_agent_specs_are_refused_and_nothing_is_created(
    settings: Settings, spec: dict[str, Any], status: int
) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        assert_error(await http.post("/v1/agents", json=spec), status, "invalid_input")
        assert [a["name"] for a in (await http.get("/v1/agents")).json()] == ["assistant"]


# --- sessions ----------------------------------------------------------------------------


async def test_sessions(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        first = await http.post("/v1/sessions", json={"agent": "assistant", "key": "k1", "metadata": {"a": 1}})
        assert first.status_code == 201, first.text
        session = first.json()
        assert session["id"].startswith("ses_") and session["agent"] == "assistant" and session["key"] == "k1"
        assert session["metadata"] == {"a": 1}
        assert session["active_run_id"] is None and session["queued"] == 0
        iso(session["created_at"])

        again = await http.post("/v1/sessions", json={"agent": "assistant", "key": "k1"})
        assert again.status_code == 200
        assert again.json()["id"] == session["id"]

        unkeyed = [await http.post("/v1/sessions", json={}) for _ in range(2)]
        assert [r.status_code for r in unkeyed] == [201, 201]
        assert unkeyed[0].json()["id"] != unkeyed[1].json()["id"]
        assert unkeyed[0].json()["agent"] == "assistant"  # the default agent

        assert_error(await http.post("/v1/sessions", json={"agent": "nobody"}), 404, "not_found")
        assert_error(await http.post("/v1/sessions", json={"agent": "assistant", "key": ""}), 422, "invalid_input")
        assert_error(await http.post("/v1/sessions", json={"agent": "assistant", "x": 1}), 422, "invalid_input")

        listed = (await http.get("/v1/sessions")).json()
        assert {s["id"] for s in listed} == {session["id"], unkeyed[0].json()["id"], unkeyed[1].json()["id"]}
        assert (await http.get("/v1/sessions", params={"agent": "nobody"})).json() == []
        one = await http.get(f"/v1/sessions/{session['id']}")
        assert one.status_code == 200 and one.json() == session
        assert_error(await http.get("/v1/sessions/ses_nope"), 404, "not_found")

        # Messages: the user's turn and the reply, both attributed to the run.
        accepted = await post(http, session["id"], "hello")
        await read_run(http, accepted["run_id"])
        messages = (await http.get(f"/v1/sessions/{session['id']}/messages")).json()
        assert [(m["role"], m["content"]) for m in messages] == [("user", "hello"), ("assistant", "echo: hello")]
        assert {m["run_id"] for m in messages} == {accepted["run_id"]}
        assert not any(m["rolled_back"] for m in messages)
        assert_error(await http.get("/v1/sessions/ses_nope/messages"), 404, "not_found")

        # The session view reflects the lane: the active run and what waits behind it.
        busy = await post(http, session["id"], LONG_WAIT)
        queued = await post(http, session["id"], "after")
        view = (await http.get(f"/v1/sessions/{session['id']}")).json()
        assert view["active_run_id"] == busy["run_id"] and view["queued"] == 1
        await hard_cancel(http, busy["run_id"])
        assert (await read_run(http, queued["run_id"]))[-1].event == "run.completed"


async def test_concurrent_creations_of_one_session_key_yield_one_session(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        responses = await asyncio.gather(*(
            http.post("/v1/sessions", json={"agent": "assistant", "key": "race"}) for _ in range(10)
        ))
        assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
        assert len({r.json()["id"] for r in responses}) == 1
        assert len((await http.get("/v1/sessions")).json()) == 1


# --- messages ----------------------------------------------------------------------------


async def test_post_message_accepts_with_202_and_names_the_run(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        response = await http.post(f"/v1/sessions/{sid}/messages", json={"content": LONG_WAIT})
        assert response.status_code == 202
        first = response.json()
        assert set(first) == {"input_id", "run_id", "session_id", "disposition"}
        assert first["input_id"].startswith("in_") and first["run_id"].startswith("run_")
        assert first["session_id"] == sid and first["disposition"] == "started"

        queued = await post(http, sid, "next")
        assert queued["disposition"] == "queued" and queued["run_id"] != first["run_id"]
        run = (await http.get(f"/v1/runs/{queued['run_id']}")).json()  # observable at once
        assert run["status"] == "queued" and run["started_at"] is None
        steered = await post(http, sid, "psst", mode="steer")
        assert steered["disposition"] == "steered" and steered["run_id"] == first["run_id"]
        collected = [await post(http, sid, f"c{i}", mode="collect") for i in range(2)]
        assert [c["disposition"] for c in collected] == ["queued", "collected"]
        assert collected[0]["run_id"] == collected[1]["run_id"]

        await hard_cancel(http, first["run_id"])
        assert (await read_run(http, collected[0]["run_id"]))[-1].event == "run.completed"


async def test_post_message_errors(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        url = f"/v1/sessions/{sid}/messages"
        assert_error(await http.post("/v1/sessions/ses_nope/messages", json={"content": "x"}), 404, "not_found")
        assert_error(await http.post(url, json={"content": "x", "mode": "shout"}), 422, "invalid_input")
        assert_error(await http.post(url, json={"content": "x", "policy": "yolo"}), 422, "invalid_input")
        assert_error(await http.post(url, json={"content": ""}), 422, "invalid_input")
        assert_error(await http.post(url, json={}), 422, "invalid_input")
        assert_error(await http.post(url, json={"content": "x", "extra": 1}), 422, "invalid_input")
        assert_error(await http.post(url, json=["content"]), 422, "invalid_input")
        for raw in (b'{"content": ', b"{not json}", b'{"content": "x"}}'):
            response = await http.post(url, content=raw, headers={"content-type": "application/json"})
            assert_error(response, 400, "malformed_json")
        assert_error(await http.post(url, json={"content": "x"}, headers={"Idempotency-Key": "k" * 257}), 422)
        # None of it stored anything.
        assert await runs_of(http, sid) == []
        assert (await http.get(f"{url}")).json() == []


async def test_bodies_over_the_limit_are_413_by_header_and_while_streaming(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_body_bytes=2048, shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        url = f"/v1/sessions/{sid}/messages"
        response = await http.post(url, json={"content": "x" * 3000})
        assert "content-length" in response.request.headers
        assert_error(response, 413, "body_too_large")

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"content": "'
            for _ in range(4):
                yield b"y" * 1000
            yield b'"}'

        response = await http.post(url, content=chunked(), headers={"content-type": "application/json"})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "body_too_large")

        assert await runs_of(http, sid) == []
        small = await post(http, sid, "z" * 1000)  # under the limit: fine
        assert (await read_run(http, small["run_id"]))[-1].event == "run.completed"


async def test_reject_on_a_busy_session_is_409_and_stores_nothing(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        busy = await post(http, sid, LONG_WAIT)
        response = await http.post(f"/v1/sessions/{sid}/messages", json={"content": "no", "mode": "reject"})
        assert_error(response, 409, "session_busy")
        assert [r["id"] for r in await runs_of(http, sid)] == [busy["run_id"]]
        await hard_cancel(http, busy["run_id"])
        idle = await post(http, sid, "yes", mode="reject")  # an idle session takes it
        assert idle["disposition"] == "started"
        await read_run(http, idle["run_id"])
        contents = [m["content"] for m in (await http.get(f"/v1/sessions/{sid}/messages")).json()]
        assert "no" not in contents and "yes" in contents


async def test_429_when_the_session_has_max_pending_inputs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_pending_inputs=2, shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        busy = await post(http, sid, LONG_WAIT)
        waiting = [await post(http, sid, f"q{i}") for i in range(2)]
        assert [w["disposition"] for w in waiting] == ["queued", "queued"]
        for mode in ("queue", "steer", "collect"):
            response = await http.post(f"/v1/sessions/{sid}/messages", json={"content": "more", "mode": mode})
            assert_error(response, 429, "too_many_pending")
        assert len(await runs_of(http, sid)) == 3
        other = await new_http_session(http)  # the limit is per session
        assert (await post(http, other, "elsewhere"))["disposition"] == "started"

        await hard_cancel(http, busy["run_id"])
        assert (await read_run(http, waiting[0]["run_id"]))[-1].event == "run.completed"
        assert (await post(http, sid, "room again"))["disposition"] in {"started", "queued"}


async def test_idempotency_key_repeat_returns_the_same_ids_and_stores_one_input(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        url = f"/v1/sessions/{sid}/messages"
        first = await http.post(url, json={"content": "once"}, headers={"Idempotency-Key": "k1"})
        repeat = await http.post(url, json={"content": "once"}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == repeat.status_code == 202
        ids = (first.json()["input_id"], first.json()["run_id"])
        assert (repeat.json()["input_id"], repeat.json()["run_id"]) == ids

        # Concurrent retries (a client that timed out and tried again) also collapse into one input.
        racing = await asyncio.gather(*(
            http.post(url, json={"content": "twice?"}, headers={"Idempotency-Key": "k2"}) for _ in range(6)
        ))
        assert {r.status_code for r in racing} == {202}
        assert len({(r.json()["input_id"], r.json()["run_id"]) for r in racing}) == 1

        other = await http.post(url, json={"content": "once"}, headers={"Idempotency-Key": "k3"})
        assert other.json()["input_id"] != first.json()["input_id"]
        await read_run(http, other.json()["run_id"])
        runs = await runs_of(http, sid)
        assert len(runs) == 3
        users = [m["content"] for m in (await http.get(f"{url}")).json() if m["role"] == "user"]
        assert sorted(users) == ["once", "once", "twice?"]
        # And a key stays remembered after the run ended.
        late = await http.post(url, json={"content": "once"}, headers={"Idempotency-Key": "k1"})
        assert late.status_code == 202 and late.json()["input_id"] == first.json()["input_id"]
        assert len(await runs_of(http, sid)) == 3


# --- runs --------------------------------------------------------------------------------


async def test_runs_list_filter_paginate_and_get(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        s1, s2 = await new_http_session(http), await new_http_session(http)
        order: list[str] = []
        for sid, content in ((s1, "a"), (s2, "b"), (s1, "c"), (s1, '/tool echo {"text": "d"}'), (s2, "/fail")):
            order.append((await post(http, sid, content))["run_id"])
        for run_id in order:
            await read_run(http, run_id)
        newest_first = order[::-1]

        everything = (await http.get("/v1/runs")).json()
        assert [r["id"] for r in everything["runs"]] == newest_first
        assert everything["limit"] == 100 and everything["offset"] == 0
        assert [r["id"] for r in await runs_of(http, s1)] == [order[3], order[2], order[0]]
        failed = (await http.get("/v1/runs", params={"status": "failed"})).json()["runs"]
        assert [r["id"] for r in failed] == [order[4]]
        assert failed[0]["error"]["code"] == "provider_error"
        both = (await http.get("/v1/runs", params={"session_id": s2, "status": ["completed", "failed"]})).json()
        assert [r["id"] for r in both["runs"]] == [order[4], order[1]]
        assert (await http.get("/v1/runs", params={"session_id": s1, "status": "failed"})).json()["runs"] == []
        assert (await http.get("/v1/runs", params={"session_id": "ses_nope"})).json()["runs"] == []

        pages = []
        for offset in (0, 2, 4, 6):
            page = (await http.get("/v1/runs", params={"limit": 2, "offset": offset})).json()
            assert page["limit"] == 2 and page["offset"] == offset
            pages.append([r["id"] for r in page["runs"]])
        assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5], []]

        for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"status": "bogus"}):
            assert_error(await http.get("/v1/runs", params=params), 422, "invalid_input")

        run = (await http.get(f"/v1/runs/{order[3]}")).json()
        assert run["id"] == order[3] and run["session_id"] == s1 and run["status"] == "completed"
        assert run["output"] == "tool results: d" and run["error"] is None and run["policy"] == "continue"
        assert iso(run["created_at"]) <= iso(run["started_at"]) <= iso(run["ended_at"])
        assert_error(await http.get("/v1/runs/run_nope"), 404, "not_found")


async def test_cancel_soft_hard_queued_and_ended(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)

        # Soft: stops at the next step boundary.
        soft = await post(http, sid, "/steps 50 50")
        queued = await post(http, sid, "behind")
        async with http.stream("GET", f"/v1/runs/{soft['run_id']}/events") as response:
            frames = sse_frames(response)
            await until_event(frames, "tool.started")
            cancelled = await http.post(f"/v1/runs/{queued['run_id']}/cancel", json={"mode": "soft"})
            assert cancelled.status_code == 202
            assert cancelled.json() == {"run_id": queued["run_id"], "mode": "soft", "status": "cancelled"}
            response_soft = await http.post(f"/v1/runs/{soft['run_id']}/cancel", json={"mode": "soft"})
            assert response_soft.status_code == 202
            assert response_soft.json() == {"run_id": soft["run_id"], "mode": "soft", "status": "running"}
            end = await until_event(frames, *TERMINAL_EVENTS)
        assert end.event == "run.cancelled"
        run = (await http.get(f"/v1/runs/{soft['run_id']}")).json()
        assert run["status"] == "cancelled" and run["error"]["code"] == "cancelled"
        assert (await read_run(http, queued["run_id"]))[-1].event == "run.cancelled"
        assert (await http.get(f"/v1/runs/{queued['run_id']}")).json()["started_at"] is None

        # Hard: at once, even in the middle of a long tool call; an empty body means soft, but
        # a soft cancel waits for a boundary that a 60 s wait reaches only at its end.
        hard = await post(http, sid, LONG_WAIT)
        async with http.stream("GET", f"/v1/runs/{hard['run_id']}/events") as response:
            frames = sse_frames(response)
            await until_event(frames, "tool.started")
            empty = await http.post(f"/v1/runs/{hard['run_id']}/cancel")
            assert empty.status_code == 202 and empty.json()["mode"] == "soft"
            started = time.monotonic()
            response_hard = await http.post(f"/v1/runs/{hard['run_id']}/cancel", json={"mode": "hard"})
            assert response_hard.status_code == 202 and response_hard.json()["mode"] == "hard"
            end = await until_event(frames, *TERMINAL_EVENTS)
            assert time.monotonic() - started < 1.0
        assert end.event == "run.cancelled"

        for run_id in (soft["run_id"], hard["run_id"]):
            assert_error(await http.post(f"/v1/runs/{run_id}/cancel", json={"mode": "hard"}), 409, "conflict")
        assert_error(await http.post("/v1/runs/run_nope/cancel", json={"mode": "soft"}), 404, "not_found")
        assert_error(await http.post(f"/v1/runs/{soft['run_id']}/cancel", json={"mode": "gentle"}), 422)


async def test_approvals(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        await create_agent(http, "careful", policy={"approvals": {"echo": "ask"}})
        sid = await new_http_session(http, "careful")
        for decision, output in (
            ("approve", "tool results: hi"),
            ("deny", "tool results: error: the call to echo was denied by a human"),
        ):
            accepted = await post(http, sid, '/tool echo {"text": "hi"}')
            run_id = accepted["run_id"]
            async with http.stream("GET", f"/v1/runs/{run_id}/events") as response:
                frames = sse_frames(response)
                requested = await until_event(frames, "approval.requested")
                call_id = requested.json["call_id"]
                assert requested.json["tool"] == "echo" and requested.json["arguments"] == {"text": "hi"}
                waiting = await until_event(frames, "run.waiting")
                assert waiting.json["pending"] == [call_id]
                assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "waiting"

                url = f"/v1/runs/{run_id}/approvals"
                assert_error(await http.post(f"{url}/call_nope", json={"decision": "approve"}), 404, "not_found")
                assert_error(await http.post(f"{url}/{call_id}", json={"decision": "maybe"}), 422, "invalid_input")
                decided = await http.post(f"{url}/{call_id}", json={"decision": decision})
                assert decided.status_code == 202
                assert decided.json() == {"run_id": run_id, "call_id": call_id, "decision": decision}
                resolved = await until_event(frames, "approval.resolved")
                assert resolved.json["decision"] == decision
                end = await until_event(frames, *TERMINAL_EVENTS)
            assert end.event == "run.completed" and end.json["output"] == output
            assert_error(await http.post(f"{url}/{call_id}", json={"decision": "approve"}), 409, "conflict")
        assert_error(await http.post("/v1/runs/run_nope/approvals/c", json={"decision": "approve"}), 404)


# --- meta, routing, auth ----------------------------------------------------------------


async def test_healthz_openapi_and_unknown_routes(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["version"]

        spec = (await http.get("/openapi.json")).json()
        paths = spec["paths"]
        expected = {
            "/healthz": {"get"},
            "/v1/agents": {"get", "post"},
            "/v1/agents/{name}": {"get", "delete"},
            "/v1/sessions": {"get", "post"},
            "/v1/sessions/{session_id}": {"get"},
            "/v1/sessions/{session_id}/messages": {"get", "post"},
            "/v1/sessions/{session_id}/events": {"get"},
            "/v1/runs": {"get"},
            "/v1/runs/{run_id}": {"get"},
            "/v1/runs/{run_id}/events": {"get"},
            "/v1/runs/{run_id}/cancel": {"post"},
            "/v1/runs/{run_id}/approvals/{call_id}": {"post"},
        }
        for path, methods in expected.items():
            assert path in paths, path
            assert methods <= set(paths[path]), (path, set(paths[path]))

        assert_error(await http.get("/v1/nothing-here"), 404, "not_found")
        assert_error(await http.get("/nope"), 404, "not_found")
        assert_error(await http.put("/healthz"), 405, "method_not_allowed")
        assert_error(await http.delete("/v1/runs"), 405, "method_not_allowed")


async def test_out_of_range_numbers_are_client_errors_not_crashes(settings: Settings) -> None:
    huge = str(2**63)  # one past what the store's 64-bit integers hold
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        accepted = await post(http, sid, "x")
        await read_run(http, accepted["run_id"])
        for path in ("/v1/runs", "/v1/sessions"):
            assert_error(await http.get(path, params={"offset": huge}), 422, "invalid_input")
        for path in (f"/v1/sessions/{sid}/events", f"/v1/runs/{accepted['run_id']}/events"):
            assert_error(await http.get(path, params={"after": huge}), 422, "invalid_input")
            assert_error(await http.get(path, headers={"Last-Event-ID": huge}), 400, "invalid_input")
        # The largest valid values are fine: nothing there.
        assert (await http.get("/v1/runs", params={"offset": 2**63 - 1})).json()["runs"] == []
        assert await read_run(http, accepted["run_id"], params={"after": 2**63 - 1}) == []


async def test_an_unexpected_error_is_a_json_500(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with asyncio.timeout(10), httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
        error = assert_error(await http.get("/boom"), 500, "internal")
        assert "a bug" not in error["message"]  # no internals leak to the client


async def test_api_token(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_token="s3cret", shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel):
        async with client(base) as anonymous:
            assert (await anonymous.get("/healthz")).status_code == 200  # open, for probes
            for method, path in (("GET", "/v1/agents"), ("POST", "/v1/sessions"), ("GET", "/v1/runs"),
                                 ("GET", "/openapi.json"), ("GET", "/v1/sessions/ses_x/events")):
                response = await anonymous.request(method, path)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
            for wrong in ("Bearer nope", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"):
                assert_error(await anonymous.get("/v1/agents", headers={"Authorization": wrong}), 401)
        async with client(base, headers={"Authorization": "Bearer s3cret"}) as http:
            assert (await http.get("/v1/agents")).status_code == 200
            sid = await new_http_session(http)
            accepted = await post(http, sid, "authorised")
            assert (await read_run(http, accepted["run_id"]))[-1].json["output"] == "echo: authorised"
            assert (await http.get("/healthz")).status_code == 200
        async with client(base, headers={"Authorization": "bearer s3cret"}) as http:
            assert (await http.get("/v1/agents")).status_code == 200


def test_check_exposure_refuses_to_bind_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(InvalidInput, match="API token"):
            check_exposure(Settings(data_dir=tmp_path, host=host))
        check_exposure(Settings(data_dir=tmp_path, host=host, api_token="s3cret"))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(Settings(data_dir=tmp_path, host=host))


async def test_a_session_tells_its_last_event_seq(settings: Settings) -> None:
    """A client that wants only what is new follows from here (``?after=last_event_seq``)."""
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        assert (await http.get(f"/v1/sessions/{sid}")).json()["last_event_seq"] == 0
        accepted = await post(http, sid, "hello")
        frames = await read_run(http, accepted["run_id"])
        assert (await http.get(f"/v1/sessions/{sid}")).json()["last_event_seq"] == frames[-1].seq
        listed = {s["id"]: s["last_event_seq"] for s in (await http.get("/v1/sessions")).json()}
        assert listed == {sid: frames[-1].seq}
