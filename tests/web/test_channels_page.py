"""The web page's channels view: each channel's state and error, and its Restart button."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import expect

from corral.channels import ChannelSpec, State
from corral.settings import Settings
from tests.web.conftest import PageFactory, web_server

LIMIT = 40


async def test_the_channels_view_shows_state_and_error_and_restarts(
        tmp_path: Path, new_page: PageFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_PAGE_HOOK_SECRET", raising=False)
    hook = ChannelSpec.model_validate({"name": "hook", "kind": "webhook", "secret_env": "TEST_PAGE_HOOK_SECRET",
                                       "callback_url": "http://127.0.0.1:9/replies", "allow": ["*"]})
    settings = Settings(data_dir=tmp_path, interrupt_grace_s=0.5, shutdown_grace_s=1.0, channels=[hook])
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        runtime = web.server.config.app.state.channels.get("hook")  # type: ignore[attr-defined]
        await runtime.wait_state(State.FAILED)
        page = await new_page()
        await page.goto(f"{web.base}/#/channels")
        row = page.get_by_test_id("channel-row")
        await expect(row).to_have_attribute("data-state", "failed")
        await expect(row.get_by_test_id("channel-error")).to_contain_text("TEST_PAGE_HOOK_SECRET")
        await expect(row.get_by_test_id("channel-outbox")).to_have_text("0 waiting")
        monkeypatch.setenv("TEST_PAGE_HOOK_SECRET", "a-secret-set-meanwhile")
        await row.get_by_test_id("channel-restart").click()
        await runtime.wait_state(State.RUNNING)
        await expect(row).to_have_attribute("data-state", "running")
        await expect(row.get_by_test_id("channel-error")).to_have_count(0)
