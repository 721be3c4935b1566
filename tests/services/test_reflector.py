"""The reflector: titles and summaries in the background, never in a session's way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from corral.kernel import Kernel, KernelConfig
from corral.kernel.runs import RunEnd
from corral.services.reflector import Reflector, ReflectorConfig, install_reflector
from corral.settings import Settings, default_agent
from corral.specs import AgentSpec
from corral.store import Store, repo
from tests.helpers import client, http_server, new_session, sqlite_url, wait_run

LIMIT = 30


@asynccontextmanager
async def reflecting(url: str, reflector_of: type[Reflector] | None = None,
                     **kwargs: object) -> AsyncIterator[tuple[Kernel, Reflector]]:
    kernel = Kernel(Store(url), KernelConfig(shutdown_grace_s=1.0), initial_agents=(default_agent(),))
    reflector = install_reflector(kernel, **kwargs)  # type: ignore[arg-type]
    async with kernel.running():
        await kernel.agents.wait_ready("assistant")
        yield kernel, reflector


async def test_a_ten_second_hook_does_not_delay_the_next_turn(tmp_path: Path) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_hook(ended: RunEnd) -> None:
        started.set()
        async with asyncio.timeout(10):  # a reflection that takes ten seconds
            await release.wait()

    async with asyncio.timeout(LIMIT), reflecting(sqlite_url(tmp_path), hooks=[slow_hook]) as (kernel, reflector):
        session = await new_session(kernel)
        first = await kernel.submit(session, "hello")
        await wait_run(kernel, first.run_id)
        await started.wait()  # the hook is now busy with the first turn...
        began = time.monotonic()
        second = await kernel.submit(session, "and again")
        run = await wait_run(kernel, second.run_id)
        elapsed = time.monotonic() - began
        assert run["output"] == "echo: and again"
        assert elapsed < 1.0, elapsed  # ...and the next turn did not wait for it
        assert reflector.done == 0  # still reflecting on the first turn
        release.set()


async def test_title_after_the_first_turn_and_a_summary_every_n_turns(tmp_path: Path) -> None:
    config = ReflectorConfig(summary_every=2)
    async with asyncio.timeout(LIMIT), reflecting(sqlite_url(tmp_path), config=config) as (kernel, reflector):
        session = await new_session(kernel)
        for turn, text in enumerate(("plan a trip to Lisbon in spring please", "what about the weather there")):
            await wait_run(kernel, (await kernel.submit(session, text)).run_id)
            await reflector.wait_reflected(turn + 1)
            row = await kernel.store.read(repo.get_session, session)
            assert row is not None and row.title == "plan a trip to Lisbon in"  # set once, after the first turn
            assert row.summary == (None if turn == 0 else "2 user messages; the latest: what about the weather there")


async def test_listings_show_the_title(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel), client(base) as http:
        listed = (await http.get("/v1/sessions")).json()
        assert listed == []  # (title and summary are part of every session the API returns)
        sid = (await http.post("/v1/sessions", json={})).json()["id"]
        one = (await http.get(f"/v1/sessions/{sid}")).json()
        assert one["title"] is None and one["summary"] is None


async def test_a_failing_reflection_is_counted_and_harmless(tmp_path: Path) -> None:
    async def broken(ended: RunEnd) -> None:
        from corral.errors import ProviderError

        raise ProviderError("the model is down")

    async with asyncio.timeout(LIMIT), reflecting(sqlite_url(tmp_path), hooks=[broken],
                                                  config=ReflectorConfig(max_concurrent=1)) as (kernel, reflector):
        session = await new_session(kernel)
        for text in ("one", "two"):
            run = await wait_run(kernel, (await kernel.submit(session, text)).run_id)
            assert run["status"] == "completed"
        await reflector.wait_reflected(2)
        assert reflector.failed == 2 and reflector.done == 0
        row = await kernel.store.read(repo.get_session, session)
        assert row is not None and row.title is None


async def test_the_summary_cadence_counts_completed_runs_across_a_restart(tmp_path: Path) -> None:
    """Turns are counted by the kernel (loaded from the store with the session, then kept), so
    "every 3 turns" means turns 3 and 6 even when the server restarted in between; a failed
    turn does not count."""
    url, config = sqlite_url(tmp_path), ReflectorConfig(summary_every=3)
    summaries: list[str | None] = []

    async def turns(kernel: Kernel, reflector: Reflector, session: str, texts: list[str], seen: int) -> int:
        for text in texts:
            run = await wait_run(kernel, (await kernel.submit(session, text)).run_id)
            seen += run["status"] == "completed"
            await reflector.wait_reflected(seen)
            row = await kernel.store.read(repo.get_session, session)
            assert row is not None
            summaries.append(row.summary)
        return seen

    async with asyncio.timeout(LIMIT):
        async with reflecting(url, config=config) as (kernel, reflector):
            session = await new_session(kernel)
            await turns(kernel, reflector, session, ["one", "two", "/fail", "three"], 0)
        async with reflecting(url, config=config) as (kernel, reflector):
            await turns(kernel, reflector, session, ["four", "five", "six"], 0)
    after_three = "4 user messages; the latest: three"  # the demo counts the failed turn's message too
    after_six = "7 user messages; the latest: six"
    assert summaries == [None, None, None, after_three, after_three, after_three, after_six]


async def test_a_summary_is_asked_of_the_compacted_conversation(tmp_path: Path) -> None:
    """A long session's summary is made from what its runs see (the latest compaction's summary
    and the messages after it), not from its whole history, which can outgrow a model's context."""
    words = " ".join(f"word{i}" for i in range(60))
    config = ReflectorConfig(summary_every=6)
    async with asyncio.timeout(LIMIT), reflecting(sqlite_url(tmp_path), config=config) as (kernel, reflector):
        await kernel.agents.create(AgentSpec(name="brief", context_budget_tokens=700))
        await kernel.agents.wait_ready("brief")
        session = await new_session(kernel, "brief")
        for turn in range(6):
            await wait_run(kernel, (await kernel.submit(session, f"turn {turn}: {words}")).run_id)
        await reflector.wait_reflected(6)
        compaction, rows = await kernel.store.read(repo.conversation, session)
        assert compaction is not None  # the context was compacted on the way
        kept = len([row for row in rows if row.role == "user"])
        assert 0 < kept < 6
        row = await kernel.store.read(repo.get_session, session)
        latest = f"turn 5: {words}"[:80]  # the demo quotes the latest message's first 80 characters
        assert row is not None and row.summary == f"{kept} user messages; the latest: {latest}"
