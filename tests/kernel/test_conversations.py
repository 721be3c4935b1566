"""The in-memory conversations (kernel/conversations.py): a run reads only what is new, and
what it gets always equals a full read of the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.kernel import Kernel, KernelConfig
from corral.kernel.conversations import Conversations, StoredMessage
from corral.specs import AgentSpec
from corral.store import Store, repo
from corral.store import store as store_module
from corral.types import Mode
from tests.helpers import KernelHarness, new_session, run_events, wait_event, wait_run


async def full_read(store: Store, session_id: str) -> tuple[Any, list[int]]:
    compaction, rows = await store.read(repo.conversation, session_id)
    return (compaction.id if compaction is not None else None), [row.id for row in rows]


async def cached_read(conversations: Conversations, session_id: str) -> tuple[Any, list[int]]:
    compaction, rows = await conversations.read(session_id)
    return (compaction.id if compaction is not None else None), [row.id for row in rows]


async def settled(kernel: Kernel) -> None:
    """Until the loop has taken in every commit so far. A test that learns of a commit by
    reading the store can get there before the writer's report of it reaches the loop (and
    with it the messages the conversations append); the kernel itself only acts on those
    reports. An empty write is reported after every earlier one."""
    await kernel.store.write(None, [])


@pytest.fixture
async def any_kernel(db_url: str) -> AsyncIterator[Kernel]:
    harness = KernelHarness(db_url, KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=1.0))
    kernel = await harness.start()
    yield kernel
    await harness.stop()


async def test_runs_read_only_new_messages_and_see_the_whole_conversation(any_kernel: Kernel) -> None:
    kernel = any_kernel
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        for content in ("first", "/steps 2 1", "third", '/tool wait {"ms": 1}'):
            accepted = await kernel.submit(session, content)
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
            await settled(kernel)
            assert await cached_read(kernel.conversations, session) == await full_read(kernel.store, session)
        # The first run missed; every later one (and each check above) only read what was new.
        assert kernel.conversations.misses == 1
        assert kernel.conversations.hits >= 7
        # The context the last turn was built from held the earlier turns: the demo model
        # answers "/tool" with its result, after three answered turns.
        _, rows = await kernel.conversations.read(session)
        assert [r.content for r in rows if r.role == "user"] == ["first", "/steps 2 1", "third", '/tool wait {"ms": 1}']


async def test_a_roll_back_is_never_served_from_memory(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        first = await kernel.submit(session, "first message")
        await wait_run(kernel, first.run_id)
        active = await kernel.submit(session, "/steps 5 200")
        await wait_event(kernel, session, "tool.completed", run_id=active.run_id)
        # The active run read the conversation: the session is in memory, with "first message".
        assert len(kernel.conversations) == 1
        rollback = await kernel.submit(session, "corrected message", mode=Mode.ROLLBACK)
        run = await wait_run(kernel, rollback.run_id)
        # Served the rolled-back "/steps" turn from memory, the demo model would still follow it.
        assert run["output"] == "echo: corrected message"
        compaction, rows = await kernel.conversations.read(session)
        assert [r.content for r in rows] == ["first message", "echo: first message",
                                             "corrected message", "echo: corrected message"]
        assert await cached_read(kernel.conversations, session) == await full_read(kernel.store, session)


async def test_a_compaction_is_never_served_from_memory(kernel: Kernel) -> None:
    words = " ".join(f"word{i}" for i in range(60))
    async with asyncio.timeout(20):
        await kernel.agents.create(AgentSpec(name="brief", context_budget_tokens=700))
        await kernel.agents.wait_ready("brief")
        session = await new_session(kernel, "brief")
        compacted = 0
        for turn in range(6):
            accepted = await kernel.submit(session, f"turn {turn}: {words}")
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
            compacted += len([e for e in await run_events(kernel, accepted.run_id) if e.type == "context.compacted"])
            # After each turn (compacted or not) memory holds exactly what the store says counts.
            assert await cached_read(kernel.conversations, session) == await full_read(kernel.store, session)
        assert compacted >= 2
        compaction, rows = await kernel.conversations.read(session)
        assert compaction is not None and all(row.id > compaction.through_message_id for row in rows)


async def test_memory_holds_at_most_capacity_sessions(tmp_path: Path) -> None:
    harness = KernelHarness(f"sqlite:///{tmp_path / 'c.db'}", KernelConfig(conversation_cache_sessions=2))
    kernel = await harness.start()
    try:
        async with asyncio.timeout(20):
            sessions = [await new_session(kernel) for _ in range(3)]
            for session in sessions:
                await wait_run(kernel, (await kernel.submit(session, "hello")).run_id)
            assert len(kernel.conversations) == 2
            misses = kernel.conversations.misses
            await kernel.conversations.read(sessions[0])  # the least recently used went first
            assert kernel.conversations.misses == misses + 1
            assert len(kernel.conversations) == 2
    finally:
        await harness.stop()


class GatedStore:
    """The real store, with reads held at a gate: forces a forget() into the middle of a read."""

    def __init__(self, store: Store):
        self.store = store
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def conversation(self, session_id: str) -> Any:
        self.reading.set()
        await self.gate.wait()
        return await self.store.conversation(session_id)

    async def messages_after(self, session_id: str, after_id: int) -> Any:
        self.reading.set()
        await self.gate.wait()
        return await self.store.messages_after(session_id, after_id)


async def a_read_held_at_the_gate(
    kernel: Kernel,
) -> tuple[str, GatedStore, Conversations, asyncio.Task[tuple[Any, Any]]]:
    """A session with one turn done, and a fresh cache's first read of it held at the store's
    gate: the test acts while the read is under way, then opens the gate."""
    session = await new_session(kernel)
    await wait_run(kernel, (await kernel.submit(session, "hello")).run_id)
    gated = GatedStore(kernel.store)
    conversations = Conversations(gated, capacity=10)  # type: ignore[arg-type]
    reading = asyncio.create_task(conversations.read(session))
    await gated.reading.wait()
    return session, gated, conversations, reading


async def test_a_read_that_overlaps_a_forget_keeps_nothing(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session, gated, conversations, reading = await a_read_held_at_the_gate(kernel)
        conversations.forget(session)
        gated.gate.set()
        _, rows = await reading
        assert [r.content for r in rows] == ["hello", "echo: hello"]
        assert len(conversations) == 0  # what was read may predate the roll-back: not kept
        await conversations.read(session)
        assert len(conversations) == 1


async def test_nothing_is_kept_with_capacity_zero(tmp_path: Path) -> None:
    harness = KernelHarness(f"sqlite:///{tmp_path / 'c.db'}", KernelConfig(conversation_cache_sessions=0),
                            agents=(AgentSpec(name="assistant"),))
    kernel = await harness.start()
    try:
        async with asyncio.timeout(20):
            session = await new_session(kernel)
            for content in ("one", "two"):
                run = await wait_run(kernel, (await kernel.submit(session, content)).run_id)
            assert run["output"] == "echo: two"
            assert len(kernel.conversations) == 0 and kernel.conversations.hits == 0
    finally:
        await harness.stop()


def _as_model_sees(rows: Any) -> list[tuple[Any, ...]]:
    return [(r.id, r.run_id, r.chat) for r in rows]


async def test_after_its_first_read_a_session_is_served_from_what_commits(any_kernel: Kernel) -> None:
    """Once read, a session's conversation follows its commits (the writer hands back each
    batch's messages with their ids): later runs read nothing, and see exactly what a read of
    the store gives, tool calls and a NUL (stored as U+FFFD) included."""
    kernel = any_kernel
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        reads: list[int] = []
        messages_after = kernel.store.messages_after

        async def counted(session_id: str, after_id: int) -> Any:
            reads.append(after_id)
            return await messages_after(session_id, after_id)

        kernel.store.messages_after = counted  # type: ignore[method-assign]
        turns = ("first", '/tool echo {"text": "a\\u0000b"}', "/steps 2 1", "last")
        for content in turns:
            accepted = await kernel.submit(session, content)
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
            await settled(kernel)
            _, stored = await kernel.store.read(repo.conversation, session)
            _, cached = await kernel.conversations.read(session)
            assert _as_model_sees(cached) == _as_model_sees([StoredMessage.from_row(row) for row in stored])
        assert reads == [] and kernel.conversations.misses == 1
        assert kernel.conversations.unread >= 2 * len(turns) - 1  # every run but the first, and each check
        tool_results = [r.content for r in cached if r.role == "tool"]
        assert tool_results[0] == "a\ufffdb"  # the echo; then the steps' waits
        assert (await wait_run(kernel, accepted.run_id))["output"] == "echo: last"


async def test_a_read_that_overlaps_a_commit_is_kept_but_read_again_next_time(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session, gated, conversations, reading = await a_read_held_at_the_gate(kernel)
        kernel.store.on_messages(lambda rows: (kernel.conversations.committed(rows), conversations.committed(rows)))
        # A commit for the session lands while it is being read: the read may or may not hold it.
        await wait_run(kernel, (await kernel.submit(session, "second")).run_id)
        gated.gate.set()
        await reading
        entry = conversations._entries.get(session)
        assert entry is not None and not entry.current
        unread = conversations.unread
        assert await cached_read(conversations, session) == await full_read(kernel.store, session)
        assert conversations.unread == unread  # that one read what was new
        await conversations.read(session)
        assert conversations.unread == unread + 1  # current again: from memory


def broken(row: dict[str, Any]) -> Any:
    raise RuntimeError("a bug between the commit and the conversations")


# Where a commit's messages can fail on their way to the conversations: the store's stored form
# of them (before the follower), and the follower turning them into conversation messages.
BREAKING_POINTS = {"stored form": (store_module, "_as_stored", broken),
                   "following": (StoredMessage, "from_committed", staticmethod(broken))}


@pytest.mark.parametrize("where", list(BREAKING_POINTS))
async def test_if_a_commits_messages_are_not_followed_every_session_is_read_again(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        await wait_run(kernel, (await kernel.submit(session, "hello")).run_id)
        assert len(kernel.conversations) == 1

        monkeypatch.setattr(*BREAKING_POINTS[where])
        accepted = await kernel.submit(session, "second")  # its write still resolves
        monkeypatch.undo()
        run = await wait_run(kernel, accepted.run_id)
        assert run["output"] == "echo: second"  # the run read its conversation from the store
        await settled(kernel)
        assert await cached_read(kernel.conversations, session) == await full_read(kernel.store, session)
