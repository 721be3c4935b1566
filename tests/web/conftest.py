"""Fixtures for the web page's tests: a real server in this event loop and Debian's Chromium.

The server is ``tests.helpers.uvicorn_server``, whose uvicorn ``Server`` stays at hand, so a
test can cut every open connection (a dropped network, as the browser sees it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright, expect

from corral.kernel import Kernel
from corral.settings import Settings
from tests.helpers import uvicorn_server

CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXPECT_MS = 15_000  # Playwright's waits; each test is bounded by its own asyncio.timeout too
expect.set_options(timeout=EXPECT_MS)


@dataclass
class WebServer:
    base: str
    kernel: Kernel
    server: uvicorn.Server
    http: httpx.AsyncClient = field(init=False)

    def drop_connections(self) -> int:
        """Abort every open TCP connection, as a network failure would; returns how many."""
        connections = list(self.server.server_state.connections)
        for connection in connections:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        return len(connections)

    async def call(self, method: str, path: str, json: Any = None, status: int | None = None) -> Any:
        response = await self.http.request(method, path, json=json)
        assert status is None or response.status_code == status, response.text
        response.raise_for_status()
        return response.json() if response.content else None

    async def agent(self, name: str, **spec: Any) -> dict[str, Any]:
        """Create an agent and wait until it is ready."""
        await self.call("POST", "/v1/agents", {"name": name, **spec}, status=201)
        await self.kernel.agents.wait_ready(name)
        return dict(await self.call("GET", f"/v1/agents/{name}"))

    async def session(self, agent: str = "assistant", key: str | None = None) -> str:
        body: dict[str, Any] = {"agent": agent}
        if key is not None:
            body["key"] = key
        return str((await self.call("POST", "/v1/sessions", body))["id"])

    async def send(self, session_id: str, content: str, mode: str = "queue") -> dict[str, Any]:
        return dict(await self.call("POST", f"/v1/sessions/{session_id}/messages",
                                    {"content": content, "mode": mode}, status=202))

    async def run(self, run_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/v1/runs/{run_id}"))


@asynccontextmanager
async def web_server(settings: Settings, token: str | None = None) -> AsyncIterator[WebServer]:
    async with uvicorn_server(settings) as (base, kernel, server):
        web = WebServer(base, kernel, server)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=web.base, timeout=30.0, headers=headers) as web.http:
            yield web


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; missing, the tests fail (CI and `make test` install it), never skip."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the web tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make browser`)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


PageFactory = Callable[[], Awaitable[Page]]


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[PageFactory]:
    """Pages that fail the test on an uncaught script error (the page must never throw)."""
    errors: list[str] = []

    async def make() -> Page:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(EXPECT_MS)
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield make
    assert not errors, f"uncaught errors in the page: {errors}"
