from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.channels import Channels, ChannelSpec
from corral.kernel import Kernel
from corral.settings import Settings
from corral.specs import AgentSpec
from tests.fakes import serve
from tests.fakes.telegram import TOKEN, FakeTelegram
from tests.helpers import client, uvicorn_server


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_TG_TOKEN", TOKEN)
    return "TEST_TG_TOKEN"


@pytest.fixture
async def fake_telegram() -> AsyncIterator[tuple[FakeTelegram, str]]:
    fake = FakeTelegram(chat_interval_s=0.2)
    async with serve(fake, close=fake.close) as base:
        yield fake, f"{base}/bot"


def telegram_spec(name: str, base_url: str, **extra: Any) -> ChannelSpec:
    options: dict[str, Any] = {"name": name, "kind": "telegram", "token_env": "TEST_TG_TOKEN", "base_url": base_url,
                               "allow": ["*"], "poll_timeout_s": 5, "chat_interval_s": 0.2, "edit_interval_s": 0.3,
                               **extra}
    return ChannelSpec.model_validate(options)


@asynccontextmanager
async def service(tmp_path: Path, channels: list[ChannelSpec], agents: list[AgentSpec] | None = None,
                  **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Kernel, Channels]]:
    """A real server with these channels, each running (waited for); yields (client, kernel, channels)."""
    config = Settings(data_dir=tmp_path, interrupt_grace_s=0.5, shutdown_grace_s=1.0, channels=channels,
                      agents=agents or [], **settings)
    async with uvicorn_server(config) as (base, kernel, server), client(base) as http:
        yield http, kernel, server.config.app.state.channels  # type: ignore[attr-defined]
