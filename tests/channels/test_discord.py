"""A Discord channel against the fake Discord (tests/fakes/discord.py): gateway in, REST out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.channels import ChannelSpec, State
from corral.specs import AgentPolicy, AgentSpec
from corral.types import Approval
from tests.channels.conftest import service
from tests.fakes import serve
from tests.fakes.discord import BOT_ID, TOKEN, FakeDiscord

LIMIT = 30
SLOW = AgentSpec(name="slow", provider="demo", provider_options={"token_ms": 60})
GATED = AgentSpec(name="gated", policy=AgentPolicy(approvals={"wait": Approval.ASK}))


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    monkeypatch.setenv("TEST_DISCORD_TOKEN", TOKEN)
    fake = FakeDiscord(heartbeat_ms=300)
    async with serve(fake) as base:
        fake.base = base
        yield fake


def discord_spec(fake: FakeDiscord, **extra: Any) -> ChannelSpec:
    return ChannelSpec.model_validate({"name": "dc", "kind": "discord", "token_env": "TEST_DISCORD_TOKEN",
                                       "base_url": f"{fake.base}/api/v10", "allow": ["*"], "chat_interval_s": 0.2,
                                       "edit_interval_s": 0.3, **extra})


async def test_a_message_over_the_gateway_streams_back_by_edits(tmp_path: Path, fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    spec = discord_spec(fake, agent="slow", chat_interval_s=None, edit_interval_s=None)  # Discord's own limits
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec], [SLOW]) as (http, kernel, channels):
        await channels.get("dc").wait_running()
        text = " ".join(f"w{i}" for i in range(25))
        await fake.push_message("10", "7", text)
        await fake.wait_for(lambda: fake.texts("10") == [f"echo: {text}"])
        [message] = fake.bot_messages("10")
        assert message.edits and fake.violations == []
        assert "10" in fake.typing
        await fake.wait_for(lambda: fake.heartbeats >= 2)  # the connection heartbeats at Hello's interval
        # The bot's own messages are not answered; a mention of it is taken out of the text.
        await fake.push_message("10", BOT_ID, "my own words")
        await fake.push_message("20", "7", f"<@{BOT_ID}> hi", guild="g1")
        await fake.wait_for(lambda: fake.texts("20") == ["echo: hi"])
        assert len((await http.get("/v1/runs")).json()["runs"]) == 2


async def test_an_approval_by_button_component(tmp_path: Path, fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    async with asyncio.timeout(LIMIT), service(tmp_path, [discord_spec(fake, agent="gated")], [GATED]) as (
            http, kernel, channels):
        await channels.get("dc").wait_running()
        await fake.push_message("10", "7", '/tool wait {"ms": 1}')
        await fake.wait_for(lambda: any(m.buttons for m in fake.bot_messages("10")))
        [question] = [m for m in fake.bot_messages("10") if m.buttons]
        await fake.push_press("10", "7", question, question.buttons[0][1])
        await fake.wait_for(lambda: any(t.startswith("tool results:") for t in fake.texts("10")))
        assert question.content.endswith("— approved") and not question.buttons
        await fake.wait_for(lambda: bool(fake.callbacks))
        assert fake.callbacks[0]["data"]["content"] == "Approved." and fake.callbacks[0]["data"]["flags"] == 64


async def test_a_long_answer_is_split_at_2000(tmp_path: Path, fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    async with asyncio.timeout(LIMIT), service(tmp_path, [discord_spec(fake)]) as (http, kernel, channels):
        await channels.get("dc").wait_running()
        text = "\n\n".join(f"Paragraph {i}. " + "words and more words. " * 8 for i in range(30))
        await fake.push_message("10", "7", text)
        await fake.wait_for(lambda: len(fake.texts("10")) >= 3 and fake.texts("10")[-1].endswith("words."))
        assert all(len(t) <= 2000 for t in fake.texts("10"))


async def test_the_gateway_reconnects_when_asked_and_a_global_429_holds_the_channel(
        tmp_path: Path, fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    async with asyncio.timeout(LIMIT), service(tmp_path, [discord_spec(fake)]) as (http, kernel, channels):
        await channels.get("dc").wait_running()
        await fake.reconnect()
        await fake.wait_for(lambda: fake.identified == 2)
        fake.fail("/messages", 429, retry_after=1.5, is_global=True)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await fake.push_message("10", "7", "one")
        await fake.push_message("11", "7", "two")
        await fake.wait_for(lambda: fake.texts("10") == ["echo: one"] and fake.texts("11") == ["echo: two"])
        assert loop.time() - began >= 1.5  # both chats waited: the limit was the bot's
        assert (await http.get("/v1/channels/dc")).json()["outbox"]["rate_limited"] == 1


async def test_a_wrong_token_is_refused_and_the_channel_fails(tmp_path: Path, fake_discord: FakeDiscord,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DISCORD_TOKEN", "wrong-token")
    async with asyncio.timeout(LIMIT), service(tmp_path, [discord_spec(fake_discord)]) as (http, kernel, channels):
        await channels.get("dc").wait_state(State.FAILED)
        view = (await http.get("/v1/channels/dc")).json()
        assert "401" in view["last_error"] and "wrong-token" not in str(view)
