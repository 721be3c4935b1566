"""Observers: attach to a session's event log at any position, never slow a run.

Each subscription has a bounded buffer. The writer publishes committed events into
every buffer without waiting; a full buffer marks its subscription lagged and stops
receiving. A lagged reader catches up from the store, where every committed event
is, so nothing is ever dropped, and the run that produced the events never waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from corral.events import Event
from corral.kernel.ports import KernelStore
from corral.types import EventType

PAGE = 500
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


class EventHub:
    """Fans committed events out to the subscriptions of their session, and to feeds."""

    def __init__(self, buffer_limit: int = 1000):
        self.buffer_limit = buffer_limit
        self._subs: dict[str, set[Subscription]] = {}
        self._feeds: set[Feed] = set()
        self.catch_ups = 0

    def __repr__(self) -> str:
        return f"<EventHub sessions={len(self._subs)} observers={self.observer_count()} feeds={len(self._feeds)}>"

    def observer_count(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    def publish(self, events: list[Event]) -> None:
        for event in events:
            for sub in self._subs.get(event.session_id, ()):
                sub.push(event)
        self.notify_feeds(events)

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
        for sub in self._subs.get(session_id, ()):
            sub.hinted = True
            sub.wake()

    def observed_sessions(self) -> list[str]:
        return list(self._subs)

    def wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.wake()
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
                        self.catch_ups += 1
                        break  # read what was missed from the store
                    if sub.hinted:
                        sub.hinted = False
                        break  # committed by another node: read it from the store
                    await sub.wait()
        finally:
            self.unsubscribe(sub)


def _cut_at_terminal(batch: list[Event], run_id: str | None) -> tuple[list[Event], bool]:
    """For a run's stream, the batch through the run's terminal event and True if that is in
    it (the stream ends there); otherwise the batch as it is and False."""
    if run_id is not None:
        for index, event in enumerate(batch):
            if event.is_terminal:
                return batch[: index + 1], True
    return batch, False
