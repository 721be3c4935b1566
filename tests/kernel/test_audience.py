"""Taps: observers written to directly as events commit, flow-controlled on their own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from corral.kernel import Kernel
from corral.kernel.audience import SLICE, Tap, TapState
from corral.memory import CROWD, FreedMemory
from corral.store import NewEvent
from corral.types import EventType
from tests.helpers import new_session


class FakeSink:
    """A connection that keeps what it is written; ``backlog`` is what the test says is unsent."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.unsent = 0
        self.gone = False
        self.resumed = asyncio.Event()
        self.on_write: Callable[[], None] = lambda: None

    def backlog(self) -> int:
        return self.unsent

    def write(self, data: bytes, *, final: bool = False) -> bool:
        if self.gone:
            return False
        self.chunks.append(data)
        self.on_write()
        return True

    def seqs(self) -> list[int]:
        return [int(line[4:]) for chunk in self.chunks for line in chunk.decode().split("\r\n")
                if line.startswith("id: ")]

    async def drained(self) -> bool:
        await self.resumed.wait()
        return True


def deltas(session: str, count: int, run_id: str = "run_x") -> list[NewEvent]:
    return [NewEvent(session, EventType.MESSAGE_DELTA, run_id, {"text": f"t{i}"}) for i in range(count)]


async def live_tap(kernel: Kernel, session: str, sink: FakeSink, **kwargs: object) -> Tap:
    tap = kernel.hub.tap(session, sink, **kwargs)  # type: ignore[arg-type]
    assert not await kernel.hub.catch_up(kernel.store, tap, sink.drained)
    assert tap.state is TapState.LIVE
    return tap


async def test_a_commit_is_one_write_per_tap_made_once_and_spread_over_turns_of_the_loop(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        kernel.hub.tail_s = 0.0  # what the taps need, without the tail every event is kept for
        session = await new_session(kernel)
        sinks = [FakeSink() for _ in range(3 * SLICE + 5)]
        every_one = asyncio.Event()
        for sink in sinks:
            sink.on_write = lambda: every_one.set() if all(s.chunks for s in sinks) else None
            await live_tap(kernel, session, sink)
        kernel.hub._audiences[session].slice_s = 0.0  # as if each write were slow: one group of taps a turn
        written: list[int] = []  # taps written by the time each commit's publishing returned
        kernel.store.on_commit(lambda events: written.append(sum(1 for sink in sinks if sink.chunks)))
        await kernel.store.write(None, deltas(session, 3))
        assert written == [SLICE]  # the commit's own turn of the loop wrote one slice, and only that
        await every_one.wait()  # the next slices, each after a pause for other work
        assert kernel.hub._audiences[session].rounds == 1
        assert all(len(sink.chunks) == 1 for sink in sinks)
        assert len({id(sink.chunks[0]) for sink in sinks}) == 1  # the batch's bytes joined once for all
        assert sinks[0].seqs() == [1, 2, 3]
        assert kernel.hub.statistics()["kept_events"] == 0  # nothing kept once every tap has it


async def test_a_tap_over_its_cap_gets_nothing_more_then_goes_on_from_what_was_kept(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        kernel.hub.tail_s = 0.0  # what the taps need, without the tail every event is kept for
        session = await new_session(kernel)
        slow, fast = FakeSink(), FakeSink()
        slow_tap = await live_tap(kernel, session, slow, cap=1000)
        await live_tap(kernel, session, fast)
        await kernel.store.write(None, deltas(session, 2))
        slow.unsent = 5000  # its connection stopped taking bytes
        await kernel.store.write(None, deltas(session, 2))
        await kernel.store.write(None, deltas(session, 2))
        assert slow_tap.state is TapState.BEHIND and kernel.hub.catch_ups == 1
        assert slow.seqs() == [1, 2] and fast.seqs() == [1, 2, 3, 4, 5, 6]
        reads = kernel.hub.tap_reads
        catching_up = asyncio.ensure_future(kernel.hub.catch_up(kernel.store, slow_tap, slow.drained))
        await kernel.store.write(None, deltas(session, 1))  # while it waits for its connection
        assert not catching_up.done() and slow.seqs() == [1, 2]
        slow.unsent = 0
        slow.resumed.set()
        assert not await catching_up
        await kernel.store.write(None, deltas(session, 2))
        assert slow_tap.state is TapState.LIVE
        assert slow.seqs() == fast.seqs() == list(range(1, 10))  # no gap, no duplicate
        assert kernel.hub.tap_reads == reads  # the audience kept what it lacked
        assert kernel.hub.statistics()["kept_events"] == 0  # and lets it go now that nobody lacks it


async def test_a_tap_behind_longer_than_the_audience_keeps_reads_the_store(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        slow, fast = FakeSink(), FakeSink()
        slow_tap = await live_tap(kernel, session, slow, cap=1000)
        await live_tap(kernel, session, fast)
        kernel.hub._audiences[session].max_recent = 3
        await kernel.store.write(None, deltas(session, 1))
        slow.unsent = 5000
        for _ in range(3):
            await kernel.store.write(None, deltas(session, 2))
        assert slow_tap.state is TapState.BEHIND and not slow_tap.kept
        assert kernel.hub.statistics()["kept_events"] <= 3  # a stalled tap holds the audience's memory no longer
        slow.unsent = 0
        slow.resumed.set()
        reads = kernel.hub.tap_reads
        assert not await kernel.hub.catch_up(kernel.store, slow_tap, slow.drained)
        assert kernel.hub.tap_reads == reads + 1
        assert slow.seqs() == fast.seqs() == list(range(1, 8))


async def test_taps_stalled_past_what_is_kept_are_outside_everything_a_commit_walks(kernel: Kernel) -> None:
    """A commit walks the joining, the live and the taps behind on kept events; a stalled tap
    whose events were let go is in none of them, so 200 stalled observers cost a stream nothing
    (before, every round walked every tap, and the stream ran at 81% of its rate)."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        fast = FakeSink()
        fast_tap = await live_tap(kernel, session, fast)
        stalled = [FakeSink() for _ in range(50)]
        stalled_taps = [await live_tap(kernel, session, sink, cap=1000) for sink in stalled]
        audience = kernel.hub._audiences[session]
        audience.max_recent = 4
        # Each commit's round writes all 51 taps at once: on a loaded machine a 2 ms slice may end
        # after one group of taps, and the rest would be written after the write returns.
        audience.slice_s = float("inf")
        await kernel.store.write(None, deltas(session, 1))
        for sink in stalled:
            sink.unsent = 5000
        await kernel.store.write(None, deltas(session, 2))
        assert all(tap.state is TapState.BEHIND and tap.kept for tap in stalled_taps)
        assert len(audience.keeping) == 50
        for _ in range(3):
            await kernel.store.write(None, deltas(session, 2))
        assert all(tap.state is TapState.BEHIND and not tap.kept for tap in stalled_taps)
        assert (list(audience.live), audience.keeping, audience.joining) == ([fast_tap], {}, {})
        assert fast.seqs() == list(range(1, 10))
        stalled[0].unsent = 0
        stalled[0].resumed.set()
        assert not await kernel.hub.catch_up(kernel.store, stalled_taps[0], stalled[0].drained)
        assert list(audience.live) == [fast_tap, stalled_taps[0]] and stalled[0].seqs() == list(range(1, 10))


async def test_what_is_kept_follows_the_lowest_tap_behind_as_taps_come_and_go(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        kernel.hub.tail_s = 0.0  # what the taps need, without the tail every event is kept for
        session = await new_session(kernel)
        first, second, fast = FakeSink(), FakeSink(), FakeSink()
        first_tap = await live_tap(kernel, session, first, cap=1000)
        second_tap = await live_tap(kernel, session, second, cap=1000)
        await live_tap(kernel, session, fast)
        await kernel.store.write(None, deltas(session, 2))
        first.unsent = 5000
        await kernel.store.write(None, deltas(session, 2))  # the first falls behind at 2
        second.unsent = 5000
        await kernel.store.write(None, deltas(session, 2))  # the second at 4
        await kernel.store.write(None, deltas(session, 2))
        assert (first_tap.last, second_tap.last) == (2, 4) and first_tap.kept and second_tap.kept
        assert kernel.hub.statistics()["kept_events"] == 6  # 3-8, for the first
        first.unsent = 0
        first.resumed.set()
        assert not await kernel.hub.catch_up(kernel.store, first_tap, first.drained)  # live from what was kept
        await kernel.store.write(None, deltas(session, 1))
        assert first.seqs() == fast.seqs() == list(range(1, 10))
        assert kernel.hub.statistics()["kept_events"] == 5  # 5-9, for the second only
        second.unsent = 0
        second.resumed.set()
        assert not await kernel.hub.catch_up(kernel.store, second_tap, second.drained)
        await kernel.store.write(None, deltas(session, 1))
        assert second.seqs() == list(range(1, 11)) and kernel.hub.statistics()["kept_events"] == 0


async def test_events_committed_while_a_tap_reads_the_store_are_kept_for_it(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        await kernel.store.write(None, deltas(session, 5))
        sink = FakeSink()
        tap = kernel.hub.tap(session, sink, after=2)
        reading = asyncio.ensure_future(kernel.hub.catch_up(kernel.store, tap, sink.drained))
        await kernel.store.write(None, deltas(session, 3))  # commits while the read is under way
        assert not await reading
        await kernel.store.write(None, deltas(session, 1))
        assert sink.seqs() == list(range(3, 10))


async def test_a_run_tap_finishes_at_its_run_end_and_a_new_run_needs_no_store_read(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        await kernel.store.write(None, deltas(session, 50, "run_old"))
        sink = FakeSink()
        tap = kernel.hub.tap(session, sink, run_id="run_new")  # opened before the run exists
        reads = kernel.hub.tap_reads
        going = asyncio.ensure_future(kernel.hub.catch_up(kernel.store, tap, sink.drained, read=False))
        await kernel.store.write(None, [NewEvent(session, EventType.RUN_QUEUED, "run_new", {}),
                                        *deltas(session, 2, "run_other"), *deltas(session, 2, "run_new")])
        assert not await going and tap.state is TapState.LIVE
        await kernel.store.write(None, [NewEvent(session, EventType.RUN_COMPLETED, "run_new", {"output": "x"}),
                                        *deltas(session, 1, "run_new")])
        assert tap.state is TapState.FINISHED and tap.wakeup.is_set()
        assert sink.seqs() == [51, 54, 55, 56]
        assert kernel.hub.tap_reads == reads
        kernel.hub.remove(tap)
        assert kernel.hub.statistics()["sessions"] == 0


async def test_a_hint_sends_live_taps_to_the_store(kernel: Kernel) -> None:
    """Events another node committed reach taps through the store, as lagged ones do."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        sink = FakeSink()
        tap = await live_tap(kernel, session, sink)
        kernel.hub.remove(tap)  # committed "elsewhere": no tap sees the commit itself
        await kernel.store.write(None, deltas(session, 2))
        tap = await live_tap(kernel, session, sink)
        assert sink.seqs() == [1, 2]
        kernel.hub.remove(tap)
        await kernel.store.write(None, deltas(session, 1))
        again = kernel.hub.tap(session, sink, after=2)
        again.state = TapState.LIVE  # as if it had joined before the foreign commit
        kernel.hub.hint(session)
        assert again.state is TapState.BEHIND and again.wakeup.is_set() and kernel.hub.catch_ups == 0
        sink.resumed.set()
        assert not await kernel.hub.catch_up(kernel.store, again, sink.drained)
        assert sink.seqs() == [1, 2, 3]


async def test_a_tap_joining_at_the_sessions_end_goes_live_without_reading_the_store(kernel: Kernel) -> None:
    """A page that has just read the session attaches with its Last-Event-ID: everything after it
    is kept by the audience (or yet to come), so it goes live from memory. Read instead, a
    thousand such joins at once on a busy session outlast what is kept, and each starts its
    read over (the audience benchmark's readers phase collapsed that way)."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        watcher = await live_tap(kernel, session, FakeSink())  # the audience exists and sees commits
        await kernel.store.write(None, deltas(session, 3))
        reads = kernel.hub.tap_reads
        at_end = FakeSink()
        await live_tap(kernel, session, at_end, after=3)
        await kernel.store.write(None, deltas(session, 2))
        assert kernel.hub.tap_reads == reads
        assert at_end.seqs() == [4, 5] and watcher.last == 5
        # A little behind the end: the tail every event is kept for still holds what it lacks.
        behind = FakeSink()
        await live_tap(kernel, session, behind, after=1)
        assert kernel.hub.tap_reads == reads and behind.seqs() == [2, 3, 4, 5]

        # From further back than what is kept, or after another node committed, it reads.
        audience = kernel.hub._audiences[session]
        audience.tail_s = 0.0
        audience._trim()
        assert audience.recent == []
        early = FakeSink()
        await live_tap(kernel, session, early, after=1)
        assert kernel.hub.tap_reads == reads + 1 and early.seqs() == [2, 3, 4, 5]
        audience.hint()
        await live_tap(kernel, session, FakeSink(), after=5)
        assert kernel.hub.tap_reads == reads + 2


async def test_the_tail_is_let_go_once_it_is_old_even_if_nothing_more_comes(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        kernel.hub.tail_s = 0.5
        await live_tap(kernel, session, FakeSink())
        await kernel.store.write(None, deltas(session, 3))
        assert kernel.hub.statistics()["kept_events"] == 3  # every tap has them: kept for the tail only
        while kernel.hub.statistics()["kept_events"]:  # noqa: ASYNC110 - the expiry is a timer of the audience's
            await asyncio.sleep(0.01)


async def test_a_crowd_of_taps_leaving_gives_memory_back(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        trimmed = asyncio.Event()
        kernel.hub.freed = FreedMemory(lambda pad: trimmed.set() or 1, settle_s=0.0)
        session = await new_session(kernel)
        taps = [await live_tap(kernel, session, FakeSink()) for _ in range(CROWD)]
        for tap in taps[:-1]:
            kernel.hub.remove(tap)
        assert kernel.hub.freed.trims == 0 and not trimmed.is_set()
        kernel.hub.remove(taps[-1])  # the crowd has left
        await trimmed.wait()
        assert kernel.hub.freed.trims == 1
