"""The feed: notices across sessions for dashboards, bounded like every observer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from corral.kernel.observers import EventHub
from corral.store import Event


def event(session_id: str, seq: int, type_: str = "run.started") -> Event:
    return Event(session_id, seq, type_, "run_x", {}, datetime.now(UTC))


async def test_a_feed_gets_only_what_it_accepts_and_never_token_deltas() -> None:
    async with asyncio.timeout(5):
        hub = EventHub()
        feed = hub.open_feed(lambda session_id: session_id == "mine")
        hub.publish([event("mine", 1), event("theirs", 1), event("mine", 2, "message.delta"), event("mine", 3)])
        assert [(await feed.get())[1]["seq"] for _ in range(2)] == [1, 3]  # type: ignore[index]
        assert not feed.buffer
        hub.close_feed(feed)
        hub.publish([event("mine", 4)])
        assert not feed.buffer  # a closed feed receives nothing


async def test_an_overflowing_feed_says_resync_once_and_then_carries_on() -> None:
    async with asyncio.timeout(5):
        hub = EventHub(buffer_limit=3)
        feed = hub.open_feed(lambda _: True)
        hub.publish([event("s", seq) for seq in range(1, 11)])  # a reader that fell behind
        assert len(feed.buffer) == 0 and feed.overflowed  # the backlog is dropped, not kept growing
        assert await feed.get() == ("resync", {})
        hub.publish([event("s", 11)])
        kind, data = await feed.get()  # type: ignore[misc]
        assert (kind, data["seq"]) == ("run.started", 11)


async def test_a_waiting_feed_wakes_for_a_notice_and_for_a_stop() -> None:
    async with asyncio.timeout(5):
        hub = EventHub()
        feed = hub.open_feed(lambda _: True)
        stop = asyncio.Event()
        waiting = asyncio.create_task(feed.get(stop))
        await asyncio.sleep(0)  # one loop turn: the task runs until it blocks on the empty feed
        assert not waiting.done()
        hub.notify("s", "session.created", {"session_id": "s"})
        assert await waiting == ("session.created", {"session_id": "s"})
        waiting = asyncio.create_task(feed.get(stop))
        await asyncio.sleep(0)
        assert not waiting.done()
        stop.set()
        hub.wake_all()
        assert await waiting is None
