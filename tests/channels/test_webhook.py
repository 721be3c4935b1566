"""The signed webhook channel: messages in at POST /v1/channels/{name}/inbound, replies out signed
to the callback (tests/fakes/webhook.py checks every signature)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from corral.channels import ChannelSpec
from corral.channels.platforms.webhook import signed_headers
from corral.specs import AgentPolicy, AgentSpec
from corral.types import Approval
from tests.channels.conftest import service
from tests.fakes import serve
from tests.fakes.webhook import FakeReceiver

LIMIT = 30
SECRET = "a-webhook-secret-for-tests"
GATED = AgentSpec(name="gated", policy=AgentPolicy(approvals={"wait": Approval.ASK}))


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeReceiver, str]]:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    fake = FakeReceiver(SECRET)
    async with serve(fake) as base:
        yield fake, f"{base}/replies"


def webhook_spec(callback: str, **extra: object) -> ChannelSpec:
    return ChannelSpec.model_validate({"name": "hook", "kind": "webhook", "secret_env": "TEST_WEBHOOK_SECRET",
                                       "callback_url": callback, "allow": ["*"], "edit_interval_s": 0.2, **extra})


async def send(http: httpx.AsyncClient, body: dict[str, object], *, secret: str = SECRET,
               now: float | None = None) -> httpx.Response:
    raw = json.dumps(body).encode()
    return await http.post("/v1/channels/hook/inbound", content=raw, headers=signed_headers(secret, raw, now))


async def test_a_signed_message_is_answered_by_a_signed_callback(
        tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback)],
                                               api_token="an-admin-token-long-enough") as (http, _, channels):
        await channels.get("hook").wait_running()
        response = await send(http, {"chat_id": "c1", "user_id": "u1", "message_id": "m1", "text": "hello"})
        assert response.status_code == 200, response.text
        [taken] = response.json()["taken"]
        assert taken["outcome"] == "accepted" and taken["run_id"].startswith("run_")
        await fake.wait_for(lambda: bool(fake.finals("c1")))
        [final] = fake.finals("c1")
        assert final["text"] == "echo: hello" and final["in_reply_to"] == "m1" and final["chat_id"] == "c1"
        assert fake.refused_signatures == 0
        assert len({r.key for r in fake.received}) == len(fake.received)  # each delivery its own key


async def test_bad_signatures_and_stale_timestamps_are_refused(
        tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    body = {"chat_id": "c1", "user_id": "u1", "message_id": "m1", "text": "hello"}
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback)]) as (http, _, channels):
        await channels.get("hook").wait_running()
        assert (await send(http, body, secret="not-the-secret")).status_code == 401
        assert (await send(http, body, now=time.time() - 301)).status_code == 401
        raw = json.dumps(body).encode()
        unsigned = await http.post("/v1/channels/hook/inbound", content=raw)
        assert unsigned.status_code == 401
        tampered = signed_headers(SECRET, raw)
        assert (await http.post("/v1/channels/hook/inbound", content=raw + b" ", headers=tampered)).status_code == 401
        assert (await send(http, {"chat_id": "c1", "user_id": "u1"})).status_code == 400
        assert (await http.post("/v1/channels/nope/inbound", content=raw, headers=tampered)).status_code == 404
        assert (await http.get("/v1/runs")).json()["runs"] == []


async def test_a_redelivered_message_runs_once(tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    body = {"chat_id": "c1", "user_id": "u1", "message_id": "m1", "text": "once"}
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback)]) as (http, _, channels):
        await channels.get("hook").wait_running()
        first, second = await asyncio.gather(send(http, body), send(http, body))
        outcomes = sorted(r.json()["taken"][0]["outcome"] for r in (first, second))
        assert outcomes in (["accepted", "duplicate"], ["accepted", "accepted"])  # at once: one input either way
        third = await send(http, body)
        assert third.json()["taken"][0]["outcome"] == "duplicate"
        await fake.wait_for(lambda: bool(fake.finals("c1")))
        assert len((await http.get("/v1/runs")).json()["runs"]) == 1


async def test_a_callback_answering_429_then_500_is_retried_with_its_retry_after(
        tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    fake.answers = [(429, 1), (500, None)]
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback)]) as (http, _, channels):
        await channels.get("hook").wait_running()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await send(http, {"chat_id": "c1", "user_id": "u1", "message_id": "m1", "text": "later"})
        await fake.wait_for(lambda: bool(fake.finals("c1")))
        assert fake.received[0].at - began >= 1.0  # the 429's Retry-After, then a 0.5 s backoff
        view = (await http.get("/v1/channels/hook")).json()
        assert view["outbox"]["rate_limited"] == 1 and view["outbox"]["retries"] == 1


async def test_an_approval_by_button_over_the_webhook(tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback, agent="gated")], [GATED]) as (
            http, _, channels):
        await channels.get("hook").wait_running()
        await send(http, {"chat_id": "c1", "user_id": "u1", "message_id": "m1", "text": '/tool wait {"ms": 1}'})
        await fake.wait_for(lambda: any("buttons" in r.body for r in fake.received))
        [question] = [r.body for r in fake.received if "buttons" in r.body]
        approve = next(b["data"] for b in question["buttons"] if b["label"] == "Approve")
        pressed = await send(http, {"chat_id": "c1", "user_id": "u1", "message_id": "m2", "button": approve})
        assert pressed.json()["taken"][0]["outcome"] == "pressed"
        await fake.wait_for(lambda: any(b["text"].startswith("tool results:") for b in fake.finals("c1")))
        assert fake.replies("c1")[question["reply_id"]].endswith("— approved")


async def test_a_user_not_allowed_gets_a_refusal_and_nothing_runs(
        tmp_path: Path, receiver: tuple[FakeReceiver, str]) -> None:
    fake, callback = receiver
    async with asyncio.timeout(LIMIT), service(tmp_path, [webhook_spec(callback, allow=["u1"])]) as (
            http, _, channels):
        await channels.get("hook").wait_running()
        response = await send(http, {"chat_id": "c9", "user_id": "u9", "message_id": "m1", "text": "hi"})
        assert response.json()["taken"][0]["outcome"] == "refused"
        await fake.wait_for(lambda: bool(fake.finals("c9")))
        assert fake.finals("c9")[0]["text"] == "Sorry, you are not allowed to talk to this bot."
        assert (await http.get("/v1/runs")).json()["runs"] == []


async def test_a_push_while_the_channel_is_down_answers_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_WEBHOOK_SECRET", raising=False)  # the channel cannot start
    spec = webhook_spec("http://127.0.0.1:9/replies")
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, _, channels):
        from corral.channels import State

        await channels.get("hook").wait_state(State.FAILED)
        raw = b"{}"
        response = await http.post("/v1/channels/hook/inbound", content=raw, headers=signed_headers("x" * 20, raw))
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
