"""The outbox's sender against a scripted platform: pace, order, retries, failures, a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from corral.channels.config import PlatformLimits
from corral.channels.errors import Rejected, RetryAfter, Transient
from corral.channels.outbox import Outbox
from corral.channels.platforms.base import Delivery, Inbound, Take
from corral.store import Store
from corral.store import channels as rows
from tests.helpers import sqlite_url

LIMIT = 20


class Scripted:
    """A platform that records each call and answers from a script (default: sent)."""

    wants_final = False

    def __init__(self) -> None:
        self.calls: list[tuple[float, Delivery]] = []
        self.script: dict[str, list[Exception]] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._ids = 0

    async def start(self) -> None: ...

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None: ...

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        return []

    async def typing(self, chat_id: str, thread_id: str | None) -> None: ...

    async def aclose(self) -> None: ...

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        self.calls.append((asyncio.get_running_loop().time(), delivery))
        try:
            planned = self.script.get(delivery.key)
            if planned:
                raise planned.pop(0)
            self._ids += 1
            return str(self._ids) if delivery.kind == "send" else target_id
        finally:
            for predicate, waiter in self._waiters:
                if not waiter.done() and predicate():
                    waiter.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        entry = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)

    def keys(self, chat: str | None = None) -> list[str]:
        return [d.key for _, d in self.calls if chat is None or d.chat_id == chat]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    started = asyncio.Event()
    writer = asyncio.create_task(store.run_writer(started))
    await started.wait()
    yield store
    store.writer.close()
    await writer
    await store.aclose()


def send(key: str, chat: str, text: str = "t", **extra: Any) -> Delivery:
    return Delivery(key, chat, None, "send", text, extra=extra)


def edit(key: str, chat: str, target: str, text: str, **extra: Any) -> Delivery:
    return Delivery(key, chat, None, "edit", text, target, extra)


async def running(outbox: Outbox, platform: Scripted) -> asyncio.Task[None]:
    return asyncio.create_task(outbox.run(platform))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


async def test_per_chat_and_global_limits_hold(store: Store) -> None:
    outbox = Outbox(store, "c", PlatformLimits(4096, 0.2, 5, 0.2))
    platform = Scripted()
    task = await running(outbox, platform)
    async with asyncio.timeout(LIMIT):
        await outbox.put([send(f"{chat}-{i}", chat) for i in range(4) for chat in "abc"])
        await outbox.wait_drained()
    await stop(task)
    for chat in "abc":
        times = [at for at, d in platform.calls if d.chat_id == chat]
        assert all(b - a >= 0.2 for a, b in zip(times, times[1:], strict=False))
        assert platform.keys(chat) == [f"{chat}-{i}" for i in range(4)]  # in order
    times = [at for at, _ in platform.calls]
    assert all(times[i + 5] - times[i] >= 1.0 for i in range(len(times) - 5))  # never 6 in a second
    assert await store.read(rows.outbox_counts, "c") == {"sent": 12}


async def test_retry_after_holds_its_chat_only(store: Store) -> None:
    outbox = Outbox(store, "c", PlatformLimits(4096, 0.0, 100, 0.1))
    platform = Scripted()
    platform.script["a-0"] = [RetryAfter("429", 1.0)]
    task = await running(outbox, platform)
    async with asyncio.timeout(LIMIT):
        await outbox.put([send("a-0", "a"), send("a-1", "a"), send("b-0", "b"), send("b-1", "b")])
        await outbox.wait_drained()
    await stop(task)
    assert platform.keys("a") == ["a-0", "a-0", "a-1"]
    a_times = [at for at, d in platform.calls if d.chat_id == "a"]
    assert a_times[1] - a_times[0] >= 1.0
    b_done = max(at for at, d in platform.calls if d.chat_id == "b")
    assert b_done < a_times[1]  # b was not held behind a
    assert outbox.rate_limited == 1


async def test_transient_failures_back_off_and_rejections_fail_the_row_only(store: Store) -> None:
    outbox = Outbox(store, "c", PlatformLimits(4096, 0.0, 100, 0.1))
    platform = Scripted()
    platform.script["a-0"] = [Transient("502"), Transient("502")]
    platform.script["a-1"] = [Rejected("400 chat not found")]
    task = await running(outbox, platform)
    async with asyncio.timeout(LIMIT):
        await outbox.put([send("a-0", "a"), send("a-1", "a"), send("a-2", "a")])
        await outbox.wait_drained()
    await stop(task)
    assert platform.keys("a") == ["a-0", "a-0", "a-0", "a-1", "a-2"]
    times = [at for at, _ in platform.calls]
    assert times[1] - times[0] >= 0.4 and times[2] - times[1] >= 0.8  # 0.5 s, then 1 s (with jitter)
    failed = await store.read(rows.outbox_rows, "c", rows.FAILED, 10)
    assert [(r.key, r.error) for r in failed] == [("a-1", "400 chat not found")]
    assert outbox.statistics()["retries"] == 2 and outbox.failed == 1


async def test_stale_edits_are_skipped_and_a_send_takes_the_newest_text(store: Store) -> None:
    outbox = Outbox(store, "c", PlatformLimits(4096, 0.0, 100, 0.1))
    platform = Scripted()
    await outbox.put([send("m", "a", "v1"), edit("m:e1", "a", "m", "v2", interim=True),
                      edit("m:e2", "a", "m", "v3", interim=True), edit("m:f", "a", "m", "v4", final=True)])
    task = await running(outbox, platform)
    async with asyncio.timeout(LIMIT):
        await platform.wait_for(lambda: len(platform.calls) == 1)
        await outbox.put([edit("m:f2", "a", "m", "v4", final=True)])  # the same text again: no call
        await outbox.put([send("n", "a", "next")])
        await outbox.wait_drained()
    await stop(task)
    assert [(d.key, d.text) for _, d in platform.calls] == [("m", "v4"), ("n", "next")]
    counts = await store.read(rows.outbox_counts, "c")
    assert counts == {"sent": 3, "superseded": 3}


async def test_a_restart_sends_what_was_pending_and_nothing_that_was_sent(store: Store) -> None:
    first = Outbox(store, "c", PlatformLimits(4096, 0.0, 100, 0.1))
    platform = Scripted()
    platform.script["a-1"] = [RetryAfter("429", 3600)]
    task = await running(first, platform)
    async with asyncio.timeout(LIMIT):
        await first.put([send("a-0", "a"), send("a-1", "a"), send("a-2", "a")])
        await platform.wait_for(lambda: platform.keys() == ["a-0", "a-1"])
    await stop(task)  # "crash": a-1 and a-2 still pending
    again = Outbox(store, "c", PlatformLimits(4096, 0.0, 100, 0.1))
    assert await again.load() == 2
    assert await again.put([send("a-0", "a"), send("a-2", "a")]) == []  # a rebuilt reply's rows: known already
    platform.calls.clear()
    task = await running(again, platform)
    async with asyncio.timeout(LIMIT):
        await again.wait_drained()
    await stop(task)
    assert platform.keys() == ["a-1", "a-2"]
