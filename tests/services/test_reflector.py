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
from corral.types import RunStatus
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


# --- the pending table's overflow policy ------------------------------------------------------


class HeldHook:
    """A hook that records what it was given and holds its slot until released."""

    def __init__(self) -> None:
        self.seen: list[RunEnd] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, ended: RunEnd) -> None:
        self.seen.append(ended)
        self.entered.set()
        await self.release.wait()


def ended(session: str, turn: int) -> RunEnd:
    return RunEnd(session, f"run_{session}_{turn}", RunStatus.COMPLETED, "ok", None, continued=False,
                  completed_runs=turn)


@asynccontextmanager
async def reflector_running(kernel: Kernel, hook: HeldHook, **config: int) -> AsyncIterator[Reflector]:
    """A reflector with one slot and ``hook``, its loop a task of the test's; ends are fed to it by hand."""
    reflector = Reflector(kernel, ReflectorConfig(max_concurrent=1, **config), hooks=[hook])
    task = asyncio.create_task(reflector.run())
    try:
        yield reflector
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_ends_of_a_session_already_pending_merge_into_its_place(kernel: Kernel) -> None:
    hook = HeldHook()
    async with asyncio.timeout(LIMIT), reflector_running(kernel, hook) as reflector:
        reflector._on_run_end(ended("ses_a", 1))
        await hook.entered.wait()  # the only slot is busy with it
        for turn in (2, 3, 4):
            reflector._on_run_end(ended("ses_a", turn))
        reflector._on_run_end(ended("ses_b", 1))
        reflector._on_run_end(RunEnd("ses_c", "run_c", RunStatus.FAILED, None, None, continued=False))  # not a turn
        assert reflector.statistics() == {"pending": 2, "done": 0, "failed": 0, "merged": 2, "dropped": 0}
        hook.release.set()
        await reflector.wait_reflected(5)  # three done, two merged
        assert [e.run_id for e in hook.seen] == ["run_ses_a_1", "run_ses_a_4", "run_ses_b_1"]  # a kept its place
        assert reflector.statistics() == {"pending": 0, "done": 3, "failed": 0, "merged": 2, "dropped": 0}


async def test_a_merge_keeps_the_end_that_is_due_a_summary(kernel: Kernel) -> None:
    hook = HeldHook()
    async with asyncio.timeout(LIMIT), reflector_running(kernel, hook, summary_every=2) as reflector:
        reflector._on_run_end(ended("ses_busy", 1))
        await hook.entered.wait()
        reflector._on_run_end(ended("ses_a", 1))
        reflector._on_run_end(ended("ses_a", 2))  # due a summary: replaces turn 1
        reflector._on_run_end(ended("ses_a", 3))  # not due: merged, the due one stays
        reflector._on_run_end(ended("ses_b", 2))
        reflector._on_run_end(ended("ses_b", 3))
        reflector._on_run_end(ended("ses_b", 4))  # due again: the newer due end replaces the older
        hook.release.set()
        await reflector.wait_reflected(7)
        assert [(e.session_id, e.completed_runs) for e in hook.seen] == [("ses_busy", 1), ("ses_a", 2), ("ses_b", 4)]
        assert reflector.merged == 4


async def test_beyond_max_pending_the_oldest_session_is_dropped_and_counted(kernel: Kernel) -> None:
    hook = HeldHook()
    async with asyncio.timeout(LIMIT), reflector_running(kernel, hook, max_pending=3) as reflector:
        reflector._on_run_end(ended("ses_0", 1))
        await hook.entered.wait()
        for n in range(1, 6):
            reflector._on_run_end(ended(f"ses_{n}", 1))
        assert reflector.statistics()["pending"] == 3 and reflector.dropped == 2
        reflector._on_run_end(ended("ses_4", 2))  # pending: merged, not a new session (nothing dropped)
        assert reflector.statistics() == {"pending": 3, "done": 0, "failed": 0, "merged": 1, "dropped": 2}
        hook.release.set()
        await reflector.wait_reflected(7)  # four done, two dropped, one merged
        assert [e.run_id for e in hook.seen] == ["run_ses_0_1", "run_ses_3_1", "run_ses_4_2", "run_ses_5_1"]


async def test_a_flood_of_ends_stays_within_the_bound_and_starts_no_task_per_end(kernel: Kernel) -> None:
    hook = HeldHook()
    async with asyncio.timeout(LIMIT), reflector_running(kernel, hook, max_pending=100) as reflector:
        reflector._on_run_end(ended("ses_first", 1))
        await hook.entered.wait()
        tasks_before = len(asyncio.all_tasks())
        for n in range(10_000):
            reflector._on_run_end(ended(f"ses_{n % 5_000}", 1 + n // 5_000))
        assert reflector.statistics() == {"pending": 100, "done": 0, "failed": 0, "merged": 0, "dropped": 9_900}
        assert len(asyncio.all_tasks()) == tasks_before  # the backlog is entries, not tasks
        hook.release.set()
        await reflector.wait_reflected(10_001)
        assert len(hook.seen) == 101
        assert [e.session_id for e in hook.seen[1:]] == [f"ses_{n}" for n in range(4_900, 5_000)]  # the newest


async def test_a_stopped_loop_gives_its_slot_back(kernel: Kernel) -> None:
    """Cancelled while it holds a slot and waits for an end (the service stopping or being
    restarted), the loop returns the slot: the next loop can still reflect."""
    hook = HeldHook()
    hook.release.set()
    reflector = Reflector(kernel, ReflectorConfig(max_concurrent=1), hooks=[hook])
    async with asyncio.timeout(LIMIT):
        for attempt in range(3):
            task = asyncio.create_task(reflector.run())
            await asyncio.sleep(0)  # one loop turn: it takes the slot and waits for an end
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled(), attempt
        task = asyncio.create_task(reflector.run())
        reflector._on_run_end(ended("ses_a", 1))
        await reflector.wait_reflected(1)
        assert reflector.done == 1
        task.cancel()
        await asyncio.wait([task])
