"""The web page under load: 50 sessions streaming at once, one of them open.

A real `corral serve` (fresh SQLite) and Debian's Chromium driven by Playwright. Every one of
50 sessions gets a queue of work (tool steps, then long streamed answers) that keeps it busy
for the whole measurement, so the feed carries a steady stream of run and tool events for all
of them while the open session also streams its token deltas. Measured in the page:

- load: navigation start to the sidebar showing all 50 sessions (`performance.now()` in the
  page, so it counts the page's own requests, scripts and first render);
- memory: `JSHeapUsedSize` from the DevTools protocol (`Performance.getMetrics`), after load
  and after the smoothness window;
- smoothness over ~10 s with the open session streaming and 50 rows updating: long tasks
  (> 50 ms, `PerformanceObserver`) and the interval between animation frames (p50, p95, max).

`python -m bench web` prints the table and writes JSON to bench/results/;
`python -m bench.web --screenshot` (re)draws docs/screenshot-chat.png instead.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, async_playwright, expect

from bench.server import corral_server

CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SESSIONS = 50
WINDOW_S = 10.0
LONG = " ".join(f"word{i}" for i in range(240))  # at token_ms 20: about 5 s of deltas
WORK = ["/steps 3 300", LONG] * 7  # each session's queue: ~40 s of steps and streamed answers
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot-chat.png"

# In the page: frame intervals from requestAnimationFrame and long tasks, for `seconds`.
MEASURE_JS = """async (seconds) => {
  const longTasks = [];
  const observer = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) longTasks.push(entry.duration);
  });
  observer.observe({type: 'longtask', buffered: false});
  const frames = [];
  const feedBefore = window.corralStats.feedFrames;
  const eventsBefore = window.corralStats.sessionEvents;
  await new Promise((resolve) => {
    const end = performance.now() + seconds * 1000;
    let last = performance.now();
    const tick = (now) => {
      frames.push(now - last);
      last = now;
      if (now < end) requestAnimationFrame(tick); else resolve();
    };
    requestAnimationFrame(tick);
  });
  observer.disconnect();
  return {frames, longTasks, feedFrames: window.corralStats.feedFrames - feedBefore,
          sessionEvents: window.corralStats.sessionEvents - eventsBefore};
}"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        sys.exit(f"the web bench needs Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    return CHROMIUM


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as response:
        if response.status >= 400:
            raise RuntimeError(f"POST {url}: {response.status} {await response.text()}")
        data: dict[str, Any] = await response.json()
        return data


async def _agent_ready(http: aiohttp.ClientSession, base: str, name: str) -> None:
    for _ in range(500):
        async with http.get(f"{base}/v1/agents/{name}") as response:
            if (await response.json())["state"] == "ready":
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"agent {name} did not become ready")


async def _load(base: str) -> list[str]:
    """50 sessions, each with a queue of work that keeps it streaming for the whole bench."""
    async with aiohttp.ClientSession() as http:
        await _post(http, f"{base}/v1/agents", {"name": "busy", "provider_options": {"token_ms": 20}})
        await _agent_ready(http, base, "busy")
        sessions = [(await _post(http, f"{base}/v1/sessions", {"agent": "busy", "key": f"load-{i:02d}"}))["id"]
                    for i in range(SESSIONS)]

        async def feed(session_id: str) -> None:
            for content in WORK:
                await _post(http, f"{base}/v1/sessions/{session_id}/messages", {"content": content})

        await asyncio.gather(*(feed(s) for s in sessions))
    return sessions


async def _heap(page: Page) -> float:
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Performance.enable")
    metrics = await cdp.send("Performance.getMetrics")
    await cdp.detach()
    return next(m["value"] for m in metrics["metrics"] if m["name"] == "JSHeapUsedSize") / 2**20


async def _measure(base: str, sessions: list[str], chromium: str) -> dict[str, Any]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(base)
            handle = await page.wait_for_function(
                f"""() => document.querySelectorAll('[data-testid="session-row"]').length >= {SESSIONS}
                        ? performance.now() : null""", timeout=30_000)
            load_ms = float(await handle.json_value())
            heap_loaded = await _heap(page)
            # Open one busy session, as a person would: by its row in the sidebar.
            await page.locator(f'[data-session-id="{sessions[0]}"] a').click()
            await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true", timeout=30_000)
            await page.wait_for_function(
                """() => document.querySelector('[data-testid="assistant-message"].streaming')""", timeout=30_000)
            window = await page.evaluate(MEASURE_JS, WINDOW_S)
            heap_after = await _heap(page)
            busy = await page.locator('[data-testid="session-status"][data-status="running"]').count()
            if errors:
                raise RuntimeError(f"the page threw: {errors}")
        finally:
            await browser.close()
    frames = window["frames"][1:]  # the first interval starts before the window
    long_tasks = window["longTasks"]
    return {
        "page_load": {"sessions": SESSIONS, "load_ms": load_ms},
        "memory": {"heap_loaded_mb": heap_loaded, "heap_after_mb": heap_after},
        "smoothness": {
            "seconds": WINDOW_S,
            "frames": len(frames),
            "frame_p50_ms": statistics.median(frames),
            "frame_p95_ms": _pct(frames, 0.95),
            "frame_max_ms": max(frames),
            "long_tasks": len(long_tasks),
            "long_task_total_ms": sum(long_tasks),
            "long_task_max_ms": max(long_tasks, default=0.0),
            "feed_frames_per_s": window["feedFrames"] / WINDOW_S,
            "session_events_per_s": window["sessionEvents"] / WINDOW_S,
            "rows_running": busy,
        },
    }


async def run() -> dict[str, Any]:
    chromium = _chromium()
    async with corral_server() as base:
        started = time.perf_counter()
        sessions = await _load(base)
        results = await _measure(base, sessions, chromium)
        results["page_load"]["setup_s"] = time.perf_counter() - started
        return results


# --- the screenshot ------------------------------------------------------------------------


async def _titled(http: aiohttp.ClientSession, base: str, session_id: str) -> str:
    """The session's title, once the reflector has written it (after its first turn)."""
    for _ in range(500):
        async with http.get(f"{base}/v1/sessions/{session_id}") as response:
            title = (await response.json()).get("title")
        if title:
            return str(title)
        await asyncio.sleep(0.02)
    raise RuntimeError(f"session {session_id} got no title")


async def screenshot(path: Path = SCREENSHOT) -> Path:
    """A conversation mid-way: a greeting, a steered run of tool steps, a call waiting for approval,
    and a sidebar with sessions in every state. Scripted against a fresh server (waiting on what
    the page shows, never on time) with animations frozen, so it redraws the same picture."""
    chromium = _chromium()
    async with corral_server() as base, aiohttp.ClientSession() as http:
        await _post(http, f"{base}/v1/agents", {"name": "planner", "policy": {"approvals": {"echo": "ask"}}})
        await _agent_ready(http, base, "planner")
        papers = await _post(http, f"{base}/v1/sessions", {"agent": "assistant", "key": "papers"})
        await _post(http, f"{base}/v1/sessions/{papers['id']}/messages",
                    {"content": "Summarise the three papers on load shedding"})
        await _titled(http, base, papers["id"])
        main = await _post(http, f"{base}/v1/sessions", {"agent": "planner", "key": "lisbon"})
        digest = await _post(http, f"{base}/v1/sessions", {"agent": "assistant", "key": "daily-digest"})
        await _post(http, f"{base}/v1/sessions/{digest['id']}/messages", {"content": "/sleep 120"})
        inbox = await _post(http, f"{base}/v1/sessions", {"agent": "assistant", "key": "inbox-triage"})
        for content in ("/sleep 120", "label the newsletters", "archive what is older than a week"):
            await _post(http, f"{base}/v1/sessions/{inbox['id']}/messages", {"content": content})

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
                await page.goto(f"{base}/#/s/{main['id']}")
                await expect(page.get_by_test_id("chat")).to_have_attribute("data-loaded", "true")

                async def say(text: str, mode: str = "queue") -> None:
                    await page.get_by_test_id("composer-mode").select_option(mode)
                    await page.get_by_test_id("composer-input").fill(text)
                    await page.get_by_test_id("composer-input").press("Enter")

                await say("Hi! Can you help me plan a weekend in Lisbon?")
                await expect(page.get_by_test_id("run-outcome").first).to_contain_text("Done")
                title = await _titled(http, base, main["id"])
                await say("/steps 2 300")
                await expect(page.get_by_test_id("tool-call").first).to_be_visible()
                await say("keep it under 500 euros", mode="steer")
                await expect(page.get_by_test_id("assistant-message").last).to_contain_text("steering seen")
                await expect(page.get_by_test_id("run-outcome").nth(1)).to_contain_text("Done")
                await say('/tool echo {"text": "book the 9:40 train to Sintra"}')
                await expect(page.get_by_test_id("approve")).to_be_visible()
                await page.get_by_test_id("composer-mode").select_option("queue")
                await page.get_by_test_id("composer-input").fill("Which day is best for the coast?")
                await page.get_by_test_id("composer-input").blur()
                await expect(page.get_by_test_id("session-row")).to_have_count(4)
                await expect(page.get_by_test_id("chat-title")).to_have_text(title)
                await expect(page.locator('[data-testid="session-queued"][data-queued="2"]')).to_be_visible()
                await expect(page.get_by_test_id("runs-count")).to_have_text("5")  # 2 running, 2 queued, 1 waiting
                path.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(path), animations="disabled")
            finally:
                await browser.close()
    return path


if __name__ == "__main__":
    if sys.argv[1:] == ["--screenshot"]:
        print(f"wrote {asyncio.run(screenshot())}")
    else:
        sys.exit("usage: python -m bench.web --screenshot   (the benchmark itself: python -m bench web)")
