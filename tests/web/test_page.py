"""The web page in a real browser (Debian's Chromium) against a real server in this event loop.

Every wait is a Playwright wait on what the page shows (``expect``, ``wait_for_function``) or
an event the server emits; nothing sleeps. Each test is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from playwright.async_api import Page, Request, expect

from corral.settings import Settings
from tests.web.conftest import PageFactory, WebServer, web_server

LIMIT = 60  # seconds per test (pytest-timeout is 120)
WORDS = " ".join(f"w{i}" for i in range(60))  # at token_ms 30: about two seconds of streaming
STREAMING = re.compile(r"\bstreaming\b")
LONG = " ".join(f"w{i}" for i in range(120))


async def open_session(page: Page, web: WebServer, session_id: str) -> None:
    await page.goto(f"{web.base}/#/s/{session_id}")
    await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")


async def say(page: Page, text: str, mode: str = "queue") -> None:
    await page.get_by_test_id("composer-mode").select_option(mode)
    await page.get_by_test_id("composer-input").fill(text)
    await page.get_by_test_id("composer-input").press("Enter")


async def wait_partial(page: Page, full: str) -> str:
    """Wait until the streaming bubble shows a strict, non-empty prefix of ``full``; return it."""
    handle = await page.wait_for_function(
        """(full) => {
            const el = document.querySelector('[data-testid="assistant-message"].streaming');
            const text = el ? el.textContent : '';
            return text.length > 'echo: '.length && text !== full && full.startsWith(text) ? text : null;
        }""",
        arg=full,
    )
    return str(await handle.json_value())


async def active_run(page: Page) -> str:
    """The run the Stop button stops, once there is one."""
    stop = page.get_by_test_id("stop")
    await expect(stop).to_be_visible()
    await expect(stop).not_to_have_attribute("data-run-id", "")
    return str(await stop.get_attribute("data-run-id"))


async def answers_of(page: Page, run_id: str) -> list[str]:
    return list(await page.locator(f'[data-testid="run"][data-run-id="{run_id}"] [data-testid="assistant-message"]')
                .all_inner_texts())


async def test_a_message_streams_in(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        await web.agent("slow", provider_options={"token_ms": 30})
        session = await web.session("slow")
        page = await new_page()
        await open_session(page, web, session)
        await say(page, WORDS)
        await expect(page.get_by_test_id("user-message")).to_have_text(WORDS)  # shown at once
        partial = await wait_partial(page, f"echo: {WORDS}")
        assert len(partial) < len(f"echo: {WORDS}")
        answer = page.get_by_test_id("assistant-message")
        await expect(answer).to_have_text(f"echo: {WORDS}")
        await expect(answer).not_to_have_class(STREAMING)
        await expect(page.get_by_test_id("chat-status")).to_have_attribute("data-status", "idle")
        await expect(page.get_by_test_id("run-outcome")).to_contain_text("Done")


async def test_steering_a_running_run(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        session = await web.session()
        page = await new_page()
        await open_session(page, web, session)
        await say(page, "/steps 5 300")
        await expect(page.get_by_test_id("tool-call").first).to_be_visible()
        await say(page, "turn left at the fork", mode="steer")
        await expect(page.get_by_test_id("steer-message")).to_contain_text("turn left at the fork")
        await expect(page.get_by_test_id("assistant-message").last).to_have_text(
            'done 5 steps; steering seen: ["turn left at the fork"]')
        await expect(page.get_by_test_id("tool-call")).to_have_count(5)
        await expect(page.get_by_test_id("pending-input")).to_have_count(0)


async def test_rollback_is_struck_through(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        session = await web.session()
        page = await new_page()
        await open_session(page, web, session)
        await say(page, "/steps 5 300")
        await expect(page.get_by_test_id("tool-call").first).to_be_visible()
        rolled = page.locator('[data-testid="run"]').first
        await say(page, "start over", mode="rollback")
        await expect(page.get_by_test_id("assistant-message")).to_have_text("echo: start over")
        await expect(rolled).to_have_class(re.compile(r"\brolled-back\b"))
        await expect(page.locator('[data-testid="run"].rolled-back')).to_have_count(1)
        await page.reload()  # from the stored messages: still marked
        await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")
        await expect(page.locator('[data-testid="run"].rolled-back [data-testid="user-message"]')).to_have_text(
            "/steps 5 300")
        await expect(page.locator('[data-testid="run"]:not(.rolled-back) [data-testid="user-message"]')).to_have_text(
            "start over")


async def test_stop_soft_then_hard(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        session = await web.session()
        page = await new_page()
        await open_session(page, web, session)
        stop = page.get_by_test_id("stop")

        # Soft: the run stops at its next step boundary.
        await say(page, "/steps 20 300")
        await expect(page.get_by_test_id("tool-call").first).to_be_visible()
        run_id = await active_run(page)
        await stop.click()
        outcome = page.locator(f'[data-run-id="{run_id}"] [data-testid="run-outcome"]')
        await expect(outcome).to_have_attribute("data-status", "cancelled")
        await expect(stop).to_be_hidden()
        assert (await web.run(run_id))["status"] == "cancelled"
        assert await page.get_by_test_id("tool-call").count() < 20

        # Shift-click is hard: a 30 s model call ends at once (a soft stop would wait for it).
        await say(page, "/sleep 30")
        run_id = await active_run(page)
        await stop.click(modifiers=["Shift"])
        await expect(page.locator(f'[data-run-id="{run_id}"] [data-testid="run-outcome"]')).to_have_attribute(
            "data-status", "cancelled")

        # A second click on the same run is hard too.
        await say(page, "/sleep 30")
        run_id = await active_run(page)
        await expect(stop).to_have_attribute("data-stage", "soft")
        await stop.click()
        await expect(stop).to_have_attribute("data-stage", "hard")
        await stop.click()
        await expect(page.locator(f'[data-run-id="{run_id}"] [data-testid="run-outcome"]')).to_have_attribute(
            "data-status", "cancelled")
        await expect(page.get_by_test_id("chat-status")).to_have_attribute("data-status", "idle")


async def test_approve_and_deny_a_tool_call(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        await web.agent("careful", policy={"approvals": {"wait": "ask"}})
        session = await web.session("careful")
        page = await new_page()
        await open_session(page, web, session)

        await say(page, '/tool wait {"ms": 10}')
        await expect(page.get_by_test_id("chat-status")).to_have_attribute("data-status", "waiting")
        await page.get_by_test_id("approve").click()
        call = page.get_by_test_id("tool-call").first
        await expect(call.get_by_test_id("decision")).to_have_text("Approved")
        await expect(call.get_by_test_id("tool-result")).to_have_text("waited 10 ms")
        await expect(page.get_by_test_id("run-outcome").first).to_contain_text("Done")

        await say(page, '/tool wait {"ms": 10}')
        call = page.get_by_test_id("tool-call").nth(1)
        await expect(call.get_by_test_id("deny")).to_be_visible()
        # A reload while it waits still offers the decision (the waiting run is replayed).
        await page.reload()
        await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")
        call = page.get_by_test_id("tool-call").nth(1)
        await call.get_by_test_id("deny").click()
        await expect(call.get_by_test_id("decision")).to_have_text("Denied")
        await expect(call.get_by_test_id("tool-result")).to_contain_text("denied")
        await expect(page.get_by_test_id("run-outcome").nth(1)).to_contain_text("Done")
        await expect(page.get_by_test_id("approve")).to_have_count(0)


async def test_reload_mid_stream_resumes_without_duplicates(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        await web.agent("slow", provider_options={"token_ms": 30})
        session = await web.session("slow")
        await web.send(session, "an earlier turn")
        page = await new_page()
        await open_session(page, web, session)
        await expect(page.get_by_test_id("assistant-message")).to_have_text("echo: an earlier turn")

        full = f"echo: {LONG}"
        await say(page, LONG)
        before = await wait_partial(page, full)
        run_id = await active_run(page)
        await page.reload()
        # The active run is replayed from its start: the partial answer is whole, not a tail.
        after = await wait_partial(page, full)
        assert after.startswith(before) or before.startswith(after)
        answer = page.locator(f'[data-run-id="{run_id}"] [data-testid="assistant-message"]')
        await expect(answer).to_have_text(full)
        await expect(answer).not_to_have_class(STREAMING)
        output = (await web.run(run_id))["output"]
        assert await answers_of(page, run_id) == [output]
        assert (await page.get_by_test_id("transcript").inner_text()).count(output) == 1
        await expect(page.get_by_test_id("user-message")).to_have_text(["an earlier turn", LONG])
        await expect(page.get_by_test_id("assistant-message")).to_have_count(2)

        # Once more after it ended: the whole conversation comes from the stored messages.
        await page.reload()
        await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")
        await expect(page.get_by_test_id("assistant-message")).to_have_text(["echo: an earlier turn", full])
        await expect(page.get_by_test_id("user-message")).to_have_text(["an earlier turn", LONG])


async def test_sidebar_updates_live(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        page = await new_page()
        await page.goto(web.base)
        await expect(page.get_by_test_id("feed-status")).to_have_attribute("data-state", "open")
        session = await web.session(key="made-elsewhere")
        row = page.locator(f'[data-testid="session-row"][data-session-id="{session}"]')
        await expect(row.get_by_test_id("session-name")).to_have_text("made-elsewhere")
        await expect(row.get_by_test_id("session-status")).to_have_attribute("data-status", "idle")

        first = await web.send(session, "/sleep 30")
        await expect(row.get_by_test_id("session-status")).to_have_attribute("data-status", "running")
        await web.send(session, "next")
        await web.send(session, "and the one after")
        queued = row.get_by_test_id("session-queued")
        await expect(queued).to_have_attribute("data-queued", "2")
        await expect(queued).to_be_visible()
        await web.call("POST", f"/v1/runs/{first['run_id']}/cancel", {"mode": "hard"}, status=202)
        await expect(queued).to_have_attribute("data-queued", "0")
        await expect(queued).to_be_hidden()
        await expect(row.get_by_test_id("session-status")).to_have_attribute("data-status", "idle")
        await expect(page.get_by_test_id("session-row")).to_have_count(1)


async def test_agents_view(settings: Settings, new_page: PageFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_TEST_MISSING_KEY", raising=False)
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        page = await new_page()
        await page.goto(f"{web.base}/#/agents")
        await expect(page.locator('[data-testid="agent-row"][data-agent="assistant"]')).to_be_visible()

        await page.get_by_test_id("agent-name").fill("late")
        await page.get_by_test_id("agent-startup-ms").fill("1500")
        await page.get_by_test_id("agent-create").click()
        late = page.locator('[data-testid="agent-row"][data-agent="late"]').get_by_test_id("agent-state")
        await expect(late).to_have_attribute("data-state", "starting")
        await expect(late).to_have_attribute("data-state", "ready")

        await page.get_by_test_id("agent-name").fill("broken")
        await page.get_by_test_id("agent-provider").select_option("openai")
        await page.get_by_test_id("agent-model").fill("x")
        await page.locator('[name="api_key_env"]').fill("CORRAL_TEST_MISSING_KEY")
        await page.get_by_test_id("agent-create").click()
        broken = page.locator('[data-testid="agent-row"][data-agent="broken"]')
        await expect(broken.get_by_test_id("agent-state")).to_have_attribute("data-state", "failed")
        await expect(broken.get_by_test_id("agent-error")).to_contain_text("CORRAL_TEST_MISSING_KEY")
        monkeypatch.setenv("CORRAL_TEST_MISSING_KEY", "sk-now-configured")  # fixed: Restart brings it up
        await broken.get_by_test_id("agent-restart").click()
        await expect(broken.get_by_test_id("agent-state")).to_have_attribute("data-state", "ready")
        await expect(broken.get_by_test_id("agent-restart")).to_have_count(0)

        await page.get_by_test_id("agent-name").fill("late")  # a name that exists: the error shows
        await page.get_by_test_id("agent-provider").select_option("demo")
        await page.get_by_test_id("agent-create").click()
        await expect(page.locator('[data-testid="toast"].toast-error')).to_contain_text("'late' already exists")


async def test_runs_view(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        session = await web.session(key="busy")
        first = await web.send(session, "/sleep 30")
        second = await web.send(session, "/sleep 30")
        page = await new_page()
        await page.goto(f"{web.base}/#/runs")
        rows = page.get_by_test_id("run-row")
        running = page.locator(f'[data-testid="run-row"][data-run-id="{first["run_id"]}"]')
        queued = page.locator(f'[data-testid="run-row"][data-run-id="{second["run_id"]}"]')
        await expect(rows).to_have_count(2)
        await expect(running).to_have_attribute("data-status", "running")
        await expect(queued).to_have_attribute("data-status", "queued")
        await expect(page.get_by_test_id("runs-count")).to_have_text("2")

        await running.get_by_test_id("run-stop").click(modifiers=["Shift"])  # hard: the sleep ends now
        await expect(running).to_have_count(0)
        await expect(queued).to_have_attribute("data-status", "running")  # refreshed from the feed
        assert (await web.run(first["run_id"]))["status"] == "cancelled"

        await queued.get_by_test_id("run-session").click()
        await expect(page.get_by_test_id("chat-title")).to_have_text("busy")
        await expect(page.get_by_test_id("chat-status")).to_have_attribute("data-status", "running")
        await page.get_by_test_id("stop").click(modifiers=["Shift"])
        await expect(page.get_by_test_id("chat-status")).to_have_attribute("data-status", "idle")
        await page.get_by_test_id("nav-runs").click()
        await expect(rows).to_have_count(0)
        await expect(page.get_by_test_id("runs-empty")).to_be_visible()


async def test_token_prompt(tmp_path: Any, new_page: PageFactory) -> None:
    token = "x" * 20
    settings = Settings(data_dir=tmp_path, api_token=token, interrupt_grace_s=0.5, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT), web_server(settings, token=token) as web:
        page = await new_page()
        await page.goto(web.base)
        prompt = page.get_by_test_id("token-prompt")
        await expect(prompt).to_be_visible()
        await page.get_by_test_id("token-input").fill("y" * 20)
        await page.get_by_test_id("token-submit").click()
        await expect(page.get_by_test_id("token-error")).to_be_visible()
        await page.get_by_test_id("token-input").fill(token)
        await page.get_by_test_id("token-submit").click()
        await expect(prompt).to_be_hidden()
        await expect(page.get_by_test_id("principal")).to_have_text("admin")
        await expect(page.get_by_test_id("feed-status")).to_have_attribute("data-state", "open")

        await page.get_by_test_id("new-session").click()
        await page.get_by_test_id("new-session-key").fill("with-token")
        await page.get_by_test_id("create-session").click()
        await expect(page.get_by_test_id("chat-title")).to_have_text("with-token")
        await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")
        await say(page, "hello")
        await expect(page.get_by_test_id("assistant-message")).to_have_text("echo: hello")

        await page.reload()  # the token is remembered
        await expect(page.get_by_test_id("assistant-message")).to_have_text("echo: hello")
        await expect(prompt).to_be_hidden()


async def test_dropped_connection_resumes_without_duplicates(settings: Settings, new_page: PageFactory) -> None:
    async with asyncio.timeout(LIMIT), web_server(settings) as web:
        await web.agent("slow", provider_options={"token_ms": 30})
        session = await web.session("slow")
        page = await new_page()
        resumed: list[str] = []

        def on_request(request: Request) -> None:
            if f"/v1/sessions/{session}/events" in request.url and "last-event-id" in request.headers:
                resumed.append(request.headers["last-event-id"])

        page.on("request", on_request)
        await open_session(page, web, session)
        full = f"echo: {WORDS}"
        await say(page, WORDS)
        await wait_partial(page, full)
        run_id = await active_run(page)
        assert web.drop_connections() >= 2  # the session's stream and the feed, at least
        answer = page.get_by_test_id("assistant-message")
        await expect(answer).to_have_text(full)
        await expect(answer).not_to_have_class(STREAMING)
        # The first request starts after the stored history; the reconnect resumes after what it saw.
        assert len(resumed) >= 2 and int(resumed[-1]) > int(resumed[0]), resumed
        assert await answers_of(page, run_id) == [(await web.run(run_id))["output"]]
        assert (await page.get_by_test_id("transcript").inner_text()).count(full) == 1
        await expect(page.get_by_test_id("feed-status")).to_have_attribute("data-state", "open")
        await expect(page.get_by_test_id("session-status")).to_have_attribute("data-status", "idle")
