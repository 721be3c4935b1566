"""Observers: attach to a session's event log at any position, never slow a run.

Two kinds, one log. A *tap* (``corral.kernel.audience``) is written to directly as events
commit, one write per tap per batch, and falls behind when its connection holds more than its
cap: the event streams of the HTTP API are taps. A *subscription* is pulled by its owner's
task (``observe_batches``): it has a bounded buffer, and a full buffer marks it lagged and
stops receiving. Either way a reader that fell behind catches up from the store, where every
committed event is, so nothing is ever dropped, and the run that produced the events never
waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from corral.events import Event
from corral.kernel.audience import DEFAULT_CAP, TAIL_S, Audience, Sink, Tap, TapState
from corral.kernel.ports import KernelStore
from corral.kernel.run_heads import RunHeads
from corral.memory import FreedMemory
from corral.types import EventType

PAGE = 500
# A tap reads the store in pages this long, and writes them in pieces of about this many bytes.
TAP_PAGE = 200
PIECE = 16 * 1024
# What a feed carries: every event but the token stream, which only the session's own log serves.
FEED_EXCLUDED = frozenset({EventType.MESSAGE_DELTA.value})


class Subscription:
    def __init__(self, session_id: str, limit: int):
        self.session_id = session_id
        self.limit = limit
        self.buffer: deque[Event] = deque()
        # Set when the buffer overflowed: events since then are only in the store.
        self.lagged = False
        # Set by a hint that another node committed events of this session: read the store.
        self.hinted = False
        self.catch_ups = 0
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Subscription {self.session_id} buffered={len(self.buffer)} lagged={self.lagged}>"

    def push(self, event: Event) -> None:
        if self.lagged:
            return
        if len(self.buffer) >= self.limit:
            self.lagged = True
        else:
            self.buffer.append(event)
        self._wakeup.set()

    async def wait(self) -> None:
        if not self.buffer and not self.lagged and not self.hinted:
            self._wakeup.clear()
            await self._wakeup.wait()

    def wake(self) -> None:
        self._wakeup.set()


class Feed:
    """Notices about many sessions (runs starting, ending, waiting; sessions created).

    Unlike a subscription this is not a log: it has no position to resume from. When
    its buffer overflows it drops what follows and says so once (``overflowed``), and
    its reader refetches current state instead, so a stalled reader still costs
    nothing but its bounded buffer.
    """

    def __init__(self, accepts: Callable[[str], bool], limit: int):
        self.accepts = accepts
        self.limit = limit
        self.buffer: deque[tuple[str, dict[str, Any]]] = deque()
        self.overflowed = False
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Feed buffered={len(self.buffer)} overflowed={self.overflowed}>"

    def push(self, kind: str, data: dict[str, Any]) -> None:
        if self.overflowed:
            return
        if len(self.buffer) >= self.limit:
            self.overflowed = True
            self.buffer.clear()
        else:
            self.buffer.append((kind, data))
        self._wakeup.set()

    async def get(self, stop: asyncio.Event | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next notice, ``("resync", {})`` after an overflow, or None once ``stop`` is set."""
        while True:
            if stop is not None and stop.is_set():
                return None
            if self.overflowed:
                self.overflowed = False
                return "resync", {}
            if self.buffer:
                return self.buffer.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()

    def wake(self) -> None:
        self._wakeup.set()


# Waits until a tap's connection has taken most of what it was written; False when the tap's
# owner is done instead (its client left, the kernel stops): the catch-up ends there.
Drained = Callable[[], Awaitable[bool]]


class EventHub:
    """Fans committed events out to the taps and subscriptions of their session, and to feeds."""

    def __init__(self, buffer_limit: int = 1000, tap_cap: int = DEFAULT_CAP):
        self.buffer_limit = buffer_limit
        self.tap_cap = tap_cap
        self.tail_s = TAIL_S  # how long an audience keeps each event at least (``Audience.tail_s``)
        self._subs: dict[str, set[Subscription]] = {}
        self._audiences: dict[str, Audience] = {}
        self._feeds: set[Feed] = set()
        self._sub_catch_ups = 0
        self._closed_tap_catch_ups = 0
        # Store reads made for taps (pages), and how many of those were a catch-up after a lag.
        self.tap_reads = 0
        # Young runs' events: a stream joining one of them reads them here, not from the store.
        self.heads = RunHeads()
        # After a crowd of observers leaves, what their connections held goes back to the system.
        self.freed = FreedMemory()
        self._taps = 0

    def __repr__(self) -> str:
        return (f"<EventHub sessions={len(self._subs.keys() | self._audiences.keys())} "
                f"observers={self.observer_count()} feeds={len(self._feeds)}>")

    @property
    def catch_ups(self) -> int:
        """Times an observer fell behind (a full buffer, a sink over its cap) and read the store."""
        live = sum(tap.catch_ups for audience in self._audiences.values() for tap in audience.taps)
        return self._sub_catch_ups + self._closed_tap_catch_ups + live

    def observer_count(self) -> int:
        return (sum(len(subs) for subs in self._subs.values())
                + sum(len(audience.taps) for audience in self._audiences.values()))

    def statistics(self) -> dict[str, Any]:
        """Observers by kind and state, what taps were written, and their store reads."""
        states = {state.value: 0 for state in TapState if state is not TapState.CLOSED}
        writes = written = 0
        for audience in self._audiences.values():
            for tap in audience.taps:
                states[tap.state.value] += 1
                writes += tap.writes
                written += tap.bytes
        return {"sessions": len(self._subs.keys() | self._audiences.keys()),
                "subscriptions": sum(len(subs) for subs in self._subs.values()), "taps": states,
                "tap_writes": writes, "tap_bytes": written, "tap_reads": self.tap_reads,
                "kept_events": sum(len(a.recent) for a in self._audiences.values()), "catch_ups": self.catch_ups}

    def publish(self, events: list[Event]) -> None:
        self.heads.add(events)
        if self._subs:
            for event in events:
                for sub in self._subs.get(event.session_id, ()):
                    sub.push(event)
        if self._audiences:
            by_session: dict[str, list[Event]] = {}
            for event in events:
                if event.session_id in self._audiences:
                    by_session.setdefault(event.session_id, []).append(event)
            if by_session:
                loop = asyncio.get_running_loop()
                for session_id, batch in by_session.items():
                    self._audiences[session_id].publish(batch, loop)
        self.notify_feeds(events)

    # --- taps ------------------------------------------------------------------------------

    def tap(self, session_id: str, sink: Sink, *, run_id: str | None = None, after: int = 0,
            cap: int | None = None) -> Tap:
        """A new observer written through ``sink``, joining: its owner calls ``catch_up`` next
        (what the session publishes from now on is kept for it), and ``remove`` at the end."""
        tap = Tap(session_id, sink, run_id=run_id, after=after, cap=self.tap_cap if cap is None else cap)
        audience = self._audiences.get(session_id)
        if audience is None:
            audience = self._audiences[session_id] = Audience(session_id, tail_s=self.tail_s)
        audience.add(tap)
        self._taps += 1
        self.freed.observers(self._taps)
        return tap

    def remove(self, tap: Tap) -> None:
        audience = self._audiences.get(tap.session_id)
        if audience is None or tap not in audience.taps:
            return
        audience.remove(tap)
        self._closed_tap_catch_ups += tap.catch_ups
        self._taps -= 1
        self.freed.observers(self._taps)
        if not audience.taps:
            audience.close()
            del self._audiences[tap.session_id]  # and with it whatever it kept

    async def catch_up(self, store: KernelStore, tap: Tap, drained: Drained, *, read: bool = True) -> bool:
        """Bring a joining (or fallen behind) tap up to date from the store, then live.

        Pages are read from the tap's position (a young run's stream takes its run's head from
        memory instead, ``RunHeads``) and written in pieces while its connection holds
        no more than its cap; past the cap the tap is behind again, keeps nothing of the page
        (it reads from its position again) and waits for its connection to drain (``drained``):
        a reader that stalled holds its cap of bytes and costs no store read until it reads
        again. Once a page comes back short, the events published since the tap's read began
        are written, with no await in between, and the tap goes live; if some of those were let
        go meanwhile, it reads again. A tap that lacks nothing the audience let go (one joining
        at the session's end) goes live at once, with no read: a thousand pages opening a busy
        session must not each read it, or the reads outlast what is kept and start over.
        ``read=False`` skips the first read: for a run created after the tap joined, every event
        comes through the hub.

        Returns True once a run's stream has written the run's terminal event.
        """
        audience = self._audiences[tap.session_id]
        while tap.state in (TapState.JOINING, TapState.BEHIND):
            if tap.state is TapState.BEHIND:
                if not await drained():
                    return False
                if audience.resume(tap):
                    continue  # live again (or behind again, or finished) from what was kept
            if read and audience.join_from_memory(tap):
                continue  # live (or finished) from what the audience keeps
            if read:
                page = self.heads.after(tap.run_id, tap.last) if tap.run_id is not None else None
                if page is None:
                    page = await store.events_after(tap.session_id, tap.last, run_id=tap.run_id, limit=TAP_PAGE)
                    self.tap_reads += 1
                if not _write_page(tap, page) or tap.state is not TapState.JOINING:
                    continue  # closed, finished, or over its cap (behind: it waits, then reads on)
                if len(page) == TAP_PAGE:
                    continue
            read = True
            audience.go_live(tap)
        return tap.state is TapState.FINISHED

    # --- subscriptions ---------------------------------------------------------------------

    def notify_feeds(self, events: list[Event]) -> None:
        """Tell the feeds of events (committed here, or by another node and read back)."""
        if not self._feeds:
            return
        for event in events:
            if event.type not in FEED_EXCLUDED:
                self.notify(event.session_id, event.type, event.payload())

    def has_feeds(self) -> bool:
        return bool(self._feeds)

    def feeds_accept(self, session_id: str) -> bool:
        return any(feed.accepts(session_id) for feed in self._feeds)

    def notify(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        """Tell the feeds that may see ``session_id`` (events, and notices that are not events)."""
        for feed in self._feeds:
            if feed.accepts(session_id):
                feed.push(kind, data)

    def open_feed(self, accepts: Callable[[str], bool]) -> Feed:
        feed = Feed(accepts, self.buffer_limit)
        self._feeds.add(feed)
        return feed

    def close_feed(self, feed: Feed) -> None:
        self._feeds.discard(feed)

    def subscribe(self, session_id: str) -> Subscription:
        sub = Subscription(session_id, self.buffer_limit)
        self._subs.setdefault(session_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.session_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.session_id]

    def hint(self, session_id: str) -> None:
        """Events of the session were committed elsewhere (another node owns it): its observers
        read the store for them, as a lagged one does."""
        self.heads.forget_session(session_id)
        for sub in self._subs.get(session_id, ()):
            sub.hinted = True
            sub.wake()
        audience = self._audiences.get(session_id)
        if audience is not None:
            audience.hint()

    def observed_sessions(self) -> list[str]:
        return list(self._subs.keys() | self._audiences.keys())

    def wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.wake()
        for audience in self._audiences.values():
            for tap in audience.taps:
                tap.wake()
        for feed in self._feeds:
            feed.wake()

    async def observe(
        self,
        store: KernelStore,
        session_id: str,
        *,
        after: int = 0,
        run_id: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[Event]:
        """Every event after ``after``, one at a time (see :meth:`observe_batches`)."""
        async for batch in self.observe_batches(store, session_id, after=after, run_id=run_id, stop=stop):
            for event in batch:
                yield event

    async def observe_batches(
        self,
        store: KernelStore,
        session_id: str,
        *,
        after: int = 0,
        run_id: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[list[Event]]:
        """Every event after ``after``: the stored backlog, then the live tail, in batches of
        whatever is ready at once (a stream sends each batch as one write).

        No gap: the subscription exists before the backlog is read, so an event is
        either in that read or arrives live. No duplicate: anything at or below the
        last yielded seq is skipped. With ``run_id`` only that run's events come, and
        the iterator ends after its terminal event.
        """
        sub = self.subscribe(session_id)
        last = after
        try:
            while True:
                while True:
                    page = await store.events_after(session_id, last, run_id=run_id, limit=PAGE)
                    if page:
                        last = page[-1].seq
                        batch, ended = _cut_at_terminal(list(page), run_id)
                        yield batch
                        if ended:
                            return
                    if len(page) < PAGE:
                        break
                while True:
                    if stop is not None and stop.is_set():
                        return
                    ready: list[Event] = []
                    while sub.buffer:
                        event = sub.buffer.popleft()
                        if event.seq <= last:
                            continue
                        last = event.seq
                        if run_id is None or event.run_id == run_id:
                            ready.append(event)
                    if ready:
                        batch, ended = _cut_at_terminal(ready, run_id)
                        yield batch
                        if ended:
                            return
                        continue
                    if sub.lagged:
                        sub.lagged = sub.hinted = False
                        sub.catch_ups += 1
                        self._sub_catch_ups += 1
                        break  # read what was missed from the store
                    if sub.hinted:
                        sub.hinted = False
                        break  # committed by another node: read it from the store
                    await sub.wait()
        finally:
            self.unsubscribe(sub)


def _write_page(tap: Tap, page: list[Event]) -> bool:
    """Write a page read for ``tap`` in pieces, while its sink holds no more than its cap; what is
    left when it does is dropped (the tap is behind: it reads from its position again). False
    if the sink is gone (the tap is closed)."""
    wanted = tap.take(page)
    index = 0
    while index < len(wanted):
        if tap.sink.backlog() > tap.cap:
            tap.state = TapState.BEHIND
            return True
        size, end = 0, index
        while end < len(wanted) and (end == index or size < PIECE):
            size += len(wanted[end].sse_frame())
            end += 1
        piece = wanted[index:end]
        finished = tap.run_id is not None and piece[-1].is_terminal
        if not tap.send(b"".join(event.sse_frame() for event in piece), piece[-1].seq, finished):
            tap.state = TapState.CLOSED
            return False
        index = end
    if page and tap.state is TapState.JOINING:
        tap.last = max(tap.last, page[-1].seq)
    return True


def _cut_at_terminal(batch: list[Event], run_id: str | None) -> tuple[list[Event], bool]:
    """For a run's stream, the batch through the run's terminal event and True if that is in
    it (the stream ends there); otherwise the batch as it is and False."""
    if run_id is not None:
        for index, event in enumerate(batch):
            if event.is_terminal:
                return batch[: index + 1], True
    return batch, False
