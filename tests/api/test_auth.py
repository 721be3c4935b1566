"""Principals: each token's holder sees and touches only its own sessions and runs; admins see all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from corral.errors import InvalidInput
from corral.principals import Principal, TokenTable
from corral.settings import PrincipalToken, Settings, load_settings
from tests.helpers import assert_error, client, http_server, post, read_run, sse_frames

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ADMIN = "admin-token-0123456789"
LIMIT = 30


def auth_settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path, api_token=ADMIN, shutdown_grace_s=1.0,
        principals=[PrincipalToken(name="alice", token=ALICE), PrincipalToken(name="bob", token=BOB)], **extra,
    )


@asynccontextmanager
async def three_clients(settings: Settings) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel):
        async with client(base, headers={"Authorization": f"Bearer {ALICE}"}) as alice, \
                client(base, headers={"Authorization": f"Bearer {BOB}"}) as bob, \
                client(base, headers={"Authorization": f"Bearer {ADMIN}"}) as admin, \
                client(base) as anonymous:
            yield {"alice": alice, "bob": bob, "admin": admin, "anonymous": anonymous}


async def alices_session_with_a_waiting_run(alice: httpx.AsyncClient) -> tuple[str, str, str]:
    """Alice's session, key 'main', whose run waits on an approval: (session id, run id, call id)."""
    created = await alice.post("/v1/agents", json={"name": "careful", "policy": {"approvals": {"wait": "ask"}}})
    assert created.status_code == 201, created.text
    session = await alice.post("/v1/sessions", json={"agent": "careful", "key": "main"})
    assert session.status_code == 201
    sid = session.json()["id"]
    accepted = await post(alice, sid, '/tool wait {"ms": 1}')
    async with alice.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
        async for frame in sse_frames(response):
            if frame.event == "approval.requested":
                return sid, accepted["run_id"], frame.json["call_id"]
    raise AssertionError("no approval was requested")


async def test_a_principal_cannot_see_or_touch_another_principals_session(tmp_path: Path) -> None:
    async with three_clients(auth_settings(tmp_path)) as http:
        sid, run_id, call_id = await alices_session_with_a_waiting_run(http["alice"])
        attempts: list[tuple[str, str, dict[str, Any] | None]] = [
            ("GET", f"/v1/sessions/{sid}", None),
            ("GET", f"/v1/sessions/{sid}/messages", None),
            ("POST", f"/v1/sessions/{sid}/messages", {"content": "let me in"}),
            ("GET", f"/v1/sessions/{sid}/events", None),
            ("GET", f"/v1/runs/{run_id}", None),
            ("GET", f"/v1/runs/{run_id}/events", None),
            ("POST", f"/v1/runs/{run_id}/cancel", {"mode": "hard"}),
            ("POST", f"/v1/runs/{run_id}/approvals/{call_id}", {"decision": "deny"}),
        ]
        for method, path, body in attempts:
            # Bob holds a valid token: a stranger's session simply does not exist for him.
            denied = await http["bob"].request(method, path, json=body)
            assert_error(denied, 404, "not_found")
            # Without a valid token nobody gets as far as the session.
            assert_error(await http["anonymous"].request(method, path, json=body), 401, "unauthorized")
            forged = await http["anonymous"].request(method, path, json=body,
                                                     headers={"Authorization": "Bearer not-a-token-at-all"})
            assert_error(forged, 401, "unauthorized")
        # Lists are filtered, not refused.
        assert (await http["bob"].get("/v1/sessions")).json() == []
        assert (await http["bob"].get("/v1/runs")).json()["runs"] == []
        assert [r["id"] for r in (await http["bob"].get(f"/v1/runs?session_id={sid}")).json()["runs"]] == []

        # Nothing Bob tried changed anything: the run still waits, no input was added.
        run = (await http["alice"].get(f"/v1/runs/{run_id}")).json()
        assert run["status"] == "waiting"
        assert run["pending_approvals"] == [{"call_id": call_id, "tool": "wait", "arguments": {"ms": 1}}]
        messages = (await http["alice"].get(f"/v1/sessions/{sid}/messages")).json()
        assert [m["content"] for m in messages if m["role"] == "user"] == ['/tool wait {"ms": 1}']

        # Alice can, and the admin sees everything.
        assert [s["id"] for s in (await http["alice"].get("/v1/sessions")).json()] == [sid]
        assert [s["owner"] for s in (await http["admin"].get("/v1/sessions")).json()] == ["alice"]
        assert (await http["admin"].get(f"/v1/runs/{run_id}")).status_code == 200
        approved = await http["alice"].post(f"/v1/runs/{run_id}/approvals/{call_id}", json={"decision": "approve"})
        assert approved.status_code == 202
        assert (await read_run(http["alice"], run_id))[-1].event == "run.completed"


async def test_session_keys_are_per_principal(tmp_path: Path) -> None:
    async with three_clients(auth_settings(tmp_path)) as http:
        mine = await http["alice"].post("/v1/sessions", json={"key": "main"})
        theirs = await http["bob"].post("/v1/sessions", json={"key": "main"})
        assert mine.status_code == theirs.status_code == 201
        assert mine.json()["id"] != theirs.json()["id"]
        assert (mine.json()["owner"], theirs.json()["owner"]) == ("alice", "bob")
        again = await http["alice"].post("/v1/sessions", json={"key": "main"})
        assert again.status_code == 200 and again.json()["id"] == mine.json()["id"]


async def test_the_feed_carries_only_the_principals_own_sessions(tmp_path: Path) -> None:
    async with three_clients(auth_settings(tmp_path)) as http:
        async with http["bob"].stream("GET", "/v1/feed") as bobs, http["admin"].stream("GET", "/v1/feed") as admins:
            bob_frames, admin_frames = sse_frames(bobs), sse_frames(admins)
            assert (await anext(bob_frames)).event == "ready"
            assert (await anext(admin_frames)).event == "ready"
            alice_sid = (await http["alice"].post("/v1/sessions", json={})).json()["id"]
            alice_run = (await post(http["alice"], alice_sid, "secret plans"))["run_id"]
            await read_run(http["alice"], alice_run)
            bob_sid = (await http["bob"].post("/v1/sessions", json={})).json()["id"]
            await post(http["bob"], bob_sid, "hello")

            seen_by_bob = []
            async for frame in bob_frames:
                seen_by_bob.append(frame)
                if frame.event == "run.completed":
                    break
            assert {json.loads(f.data)["session_id"] for f in seen_by_bob} == {bob_sid}
            assert "secret plans" not in "".join(f.data for f in seen_by_bob)
            assert [f.event for f in seen_by_bob] == [
                "session.created", "run.queued", "run.started", "message.completed", "run.completed"]
            admin_sessions = set()
            async for frame in admin_frames:
                admin_sessions.add(json.loads(frame.data)["session_id"])
                if frame.event == "run.completed" and json.loads(frame.data)["session_id"] == bob_sid:
                    break
            assert admin_sessions == {alice_sid, bob_sid}


async def test_agents_are_shared_but_only_an_admin_deletes_one(tmp_path: Path) -> None:
    async with three_clients(auth_settings(tmp_path)) as http:
        assert (await http["alice"].post("/v1/agents", json={"name": "shared"})).status_code == 201
        assert [a["name"] for a in (await http["bob"].get("/v1/agents")).json()] == ["assistant", "shared"]
        assert_error(await http["bob"].delete("/v1/agents/shared"), 403, "forbidden")
        assert (await http["bob"].get("/v1/agents/shared")).status_code == 200
        assert (await http["admin"].delete("/v1/agents/shared")).status_code == 204


async def test_me_names_the_principal(tmp_path: Path) -> None:
    async with three_clients(auth_settings(tmp_path)) as http:
        assert (await http["alice"].get("/v1/me")).json() == {"principal": "alice", "admin": False,
                                                              "auth_required": True}
        assert (await http["admin"].get("/v1/me")).json()["admin"] is True
        assert_error(await http["anonymous"].get("/v1/me"), 401)
        # The page itself is public (it holds no data and asks for a token); the API is not.
        page = await http["anonymous"].get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_without_tokens_everyone_is_the_local_admin(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        assert (await http.get("/v1/me")).json() == {"principal": "local", "admin": True, "auth_required": False}
        assert (await http.post("/v1/sessions", json={})).json()["owner"] == "local"


async def test_cors_is_off_unless_configured(tmp_path: Path, settings: Settings) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        response = await http.get("/v1/agents", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in (await http.options("/v1/agents", headers=preflight)).headers
    allowed = auth_settings(tmp_path / "cors", cors_origins=["https://app.example"])
    async with asyncio.timeout(LIMIT), http_server(allowed) as (base, _kernel), client(base) as http:
        answered = await http.options("/v1/sessions", headers=preflight)  # no token: preflights carry none
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options("/v1/sessions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        a2a = await http.options("/a2a/assistant", headers={**preflight,
                                 "Access-Control-Request-Headers": "authorization,content-type,a2a-version"})
        assert a2a.status_code == 200 and "a2a-version" in a2a.headers["access-control-allow-headers"].lower()
        # CORS does not open the API: the real request still needs a token.
        assert_error(await http.get("/v1/agents", headers={"Origin": "https://app.example"}), 401)


def test_token_settings_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        PrincipalToken(name="alice", token="short")
    with pytest.raises(ValidationError):
        PrincipalToken(name="no spaces please", token=ALICE)
    with pytest.raises(InvalidInput, match="share one API token"):
        Settings(data_dir=tmp_path, principals=[PrincipalToken(name="a", token=ALICE),
                                                PrincipalToken(name="b", token=ALICE)]).token_table()
    monkeypatch.setenv("CORRAL_PRINCIPALS", json.dumps([{"name": "carol", "token": "carol-token-0123456789"}]))
    table = load_settings(None).token_table()
    assert table.lookup("carol-token-0123456789") == Principal("carol")
    assert table.lookup("carol-token-012345678") is None
    assert repr(table) == "<TokenTable tokens=1>"  # never the tokens themselves
    assert ALICE not in repr(auth_settings(tmp_path))


def test_a_token_table_without_entries_is_disabled() -> None:
    assert not TokenTable().enabled
    assert TokenTable([(ALICE, Principal("alice"))]).enabled
