"""A Slack channel against the fake Slack (tests/fakes/slack.py): Socket Mode and the Events API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from corral.channels import ChannelSpec
from corral.specs import AgentPolicy, AgentSpec
from corral.types import Approval
from tests.channels.conftest import service
from tests.fakes import serve
from tests.fakes.slack import APP_TOKEN, BOT_TOKEN, BOT_USER, FakeSlack

LIMIT = 30
SIGNING = "a-slack-signing-secret"
SLOW = AgentSpec(name="slow", provider="demo", provider_options={"token_ms": 60})
GATED = AgentSpec(name="gated", policy=AgentPolicy(approvals={"wait": Approval.ASK}))


@pytest.fixture
async def fake_slack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeSlack]:
    monkeypatch.setenv("TEST_SLACK_BOT", BOT_TOKEN)
    monkeypatch.setenv("TEST_SLACK_APP", APP_TOKEN)
    monkeypatch.setenv("TEST_SLACK_SIGNING", SIGNING)
    fake = FakeSlack(chat_interval_s=0.2)
    async with serve(fake) as base:
        fake.base = base
        yield fake


def slack_spec(fake: FakeSlack, **extra: Any) -> ChannelSpec:
    return ChannelSpec.model_validate({"name": "sl", "kind": "slack", "token_env": "TEST_SLACK_BOT",
                                       "app_token_env": "TEST_SLACK_APP", "signing_secret_env": "TEST_SLACK_SIGNING",
                                       "base_url": f"{fake.base}/api/", "allow": ["*"], "chat_interval_s": 0.2,
                                       "edit_interval_s": 0.3, **extra})


def signed(body: bytes, *, secret: str = SIGNING, age_s: float = 0) -> dict[str, str]:
    stamp = str(int(time.time() - age_s))
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"x-slack-request-timestamp": stamp, "x-slack-signature": f"v0={digest}"}


async def test_socket_mode_message_in_streamed_answer_out_by_updates(tmp_path: Path, fake_slack: FakeSlack) -> None:
    fake = fake_slack
    async with asyncio.timeout(LIMIT), service(tmp_path, [slack_spec(fake, agent="slow")], [SLOW]) as (
            http, kernel, channels):
        await channels.get("sl").wait_running()
        text = " ".join(f"w{i}" for i in range(25))
        event = await fake.push_message("D1", "U7", text)
        await fake.wait_for(lambda: fake.texts("D1") == [f"echo: {text}"])
        [message] = fake.bot_messages("D1")
        assert message.updates and message.updates[-1] == f"echo: {text}"
        assert fake.acked  # the envelope was acknowledged once taken in
        assert fake.violations == []
        # Slack sends an unacknowledged envelope again: the same message runs once.
        await fake.push_message("D1", "U7", text, ts=event["ts"], retry=1)
        await fake.push_message("D1", "U7", "next")
        await fake.wait_for(lambda: fake.texts("D1")[-1:] == ["echo: next"])
        assert len((await http.get("/v1/runs")).json()["runs"]) == 2
        # A message of the bot itself is no message to answer.
        await fake.push_message("D1", BOT_USER, "my own words")
        await fake.push_message("D1", "U7", "last")
        await fake.wait_for(lambda: fake.texts("D1")[-1:] == ["echo: last"])
        assert len((await http.get("/v1/runs")).json()["runs"]) == 3


async def test_a_thread_is_a_session_of_its_own_and_replies_go_into_it(tmp_path: Path, fake_slack: FakeSlack) -> None:
    fake = fake_slack
    async with asyncio.timeout(LIMIT), service(tmp_path, [slack_spec(fake)]) as (http, kernel, channels):
        await channels.get("sl").wait_running()
        await fake.push_message("C1", "U7", f"<@{BOT_USER}> in the channel", channel_type="channel")
        await fake.push_message("C1", "U7", "in a thread", channel_type="channel", thread_ts="100.1")
        await fake.wait_for(lambda: len(fake.texts("C1")) == 2)
        by_thread = {m.thread_ts: m.text for m in fake.bot_messages("C1")}
        assert by_thread == {None: "echo: in the channel", "100.1": "echo: in a thread"}
        keys = sorted(s["key"] for s in (await http.get("/v1/sessions")).json())
        assert keys == ["channel:sl:C1", "channel:sl:C1:100.1"]


async def test_an_approval_by_block_kit_button(tmp_path: Path, fake_slack: FakeSlack) -> None:
    fake = fake_slack
    async with asyncio.timeout(LIMIT), service(tmp_path, [slack_spec(fake, agent="gated")], [GATED]) as (
            http, kernel, channels):
        await channels.get("sl").wait_running()
        await fake.push_message("D1", "U7", '/tool wait {"ms": 1}')
        await fake.wait_for(lambda: any(m.buttons for m in fake.bot_messages("D1")))
        [question] = [m for m in fake.bot_messages("D1") if m.buttons]
        assert [label for label, _ in question.buttons] == ["Approve", "Deny"]
        await fake.push_press("D1", "U7", question, question.buttons[0][1])
        await fake.wait_for(lambda: any(t.startswith("tool results:") for t in fake.texts("D1")))
        assert question.text.endswith("— approved") and not question.buttons


async def test_socket_mode_reconnects_when_slack_asks(tmp_path: Path, fake_slack: FakeSlack) -> None:
    fake = fake_slack
    async with asyncio.timeout(LIMIT), service(tmp_path, [slack_spec(fake)]) as (http, kernel, channels):
        await channels.get("sl").wait_running()
        await fake.wait_for(lambda: fake.connections == 1)
        await fake.disconnect()
        await fake.wait_for(lambda: fake.connections == 2)
        await fake.push_message("D1", "U7", "after the reconnect")
        await fake.wait_for(lambda: fake.texts("D1") == ["echo: after the reconnect"])


async def test_a_wrong_token_fails_the_channel(tmp_path: Path, fake_slack: FakeSlack,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.channels import State

    monkeypatch.setenv("TEST_SLACK_BOT", "xoxb-wrong")
    async with asyncio.timeout(LIMIT), service(tmp_path, [slack_spec(fake_slack)]) as (http, kernel, channels):
        await channels.get("sl").wait_state(State.FAILED)
        view = (await http.get("/v1/channels/sl")).json()
        assert "invalid_auth" in view["last_error"] and "xoxb" not in json.dumps(view)


async def test_the_events_api_checks_signatures_answers_the_challenge_and_drops_retries(
        tmp_path: Path, fake_slack: FakeSlack) -> None:
    fake = fake_slack
    spec = slack_spec(fake, transport="events")
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec], api_token="an-admin-token-long-enough") as (
            http, kernel, channels):
        await channels.get("sl").wait_running()
        challenge = json.dumps({"type": "url_verification", "challenge": "abc123"}).encode()
        answer = await http.post("/v1/channels/sl/slack/events", content=challenge, headers=signed(challenge))
        assert answer.status_code == 200 and answer.json() == {"challenge": "abc123"}
        event = {"type": "event_callback", "event_id": "Ev1", "event": {
            "type": "message", "channel": "D1", "user": "U7", "text": "over http", "ts": "5.5", "channel_type": "im"}}
        body = json.dumps(event).encode()
        assert (await http.post("/v1/channels/sl/slack/events", content=body,
                                headers=signed(body, secret="wrong"))).status_code == 401
        assert (await http.post("/v1/channels/sl/slack/events", content=body,
                                headers=signed(body, age_s=400))).status_code == 401
        first = await http.post("/v1/channels/sl/slack/events", content=body, headers=signed(body))
        assert first.status_code == 200 and first.json()["taken"][0]["outcome"] == "accepted"
        retry = await http.post("/v1/channels/sl/slack/events", content=body,
                                headers={**signed(body), "x-slack-retry-num": "1", "x-slack-retry-reason": "timeout"})
        assert retry.json()["taken"][0]["outcome"] == "duplicate"
        await fake.wait_for(lambda: fake.texts("D1") == ["echo: over http"])
        # Interactivity arrives form-encoded, signed alike.
        press = {"type": "block_actions", "user": {"id": "U7"}, "channel": {"id": "D1"}, "message": {"ts": "9.9"},
                 "actions": [{"value": "ap:run_x:abc:y", "action_ts": "10.1"}]}
        form = urlencode({"payload": json.dumps(press)}).encode()
        pressed = await http.post("/v1/channels/sl/slack/events", content=form,
                                  headers={**signed(form), "content-type": "application/x-www-form-urlencoded"})
        assert pressed.json()["taken"][0]["outcome"] == "pressed"
