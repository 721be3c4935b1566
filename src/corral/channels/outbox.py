"""The durable outbox of one channel, and the sender that empties it.

Every chunk, edit and button acknowledgement is a row (``channel_outbox``) with an
idempotency key before it is sent; the sender marks it ``sent`` once the platform took it,
and a restart sends every row still ``pending`` (a kill -9 loses no reply and, but for a
call in flight at that instant, sends none twice).

Order and pace:
- one chat's rows go out one at a time, in the order they were written; an edit of a message
  waits behind that message's send;
- ``chat_interval_s`` between two calls in a chat and at most ``global_per_s`` calls in any
  second, all chats together (with a small margin, so the platform's own clock never counts
  two of ours as too close);
- a streaming edit that a later edit of the same message has made stale is never sent
  (``superseded``), and a send takes the newest text queued for it: under pressure a reply
  costs fewer calls, not more time;
- a chat with a reply to start goes before a chat with only a streaming edit to make.

Failures: ``RetryAfter`` (429) holds the chat (or, for a limit of the whole bot, every chat)
for the time the platform asked; ``Transient`` retries with exponential backoff (0.5 s up to
60 s) until the row is ``outbox_max_age_s`` old; ``Rejected`` marks the row ``failed`` with the
platform's answer, kept and listed at ``GET /v1/channels/{name}/outbox?status=failed``. A
failed row never blocks its chat: the chat's next row goes on.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from corral.channels.config import PlatformLimits
from corral.channels.errors import Rejected, RetryAfter, Transient
from corral.channels.platforms.base import Delivery, Platform
from corral.clock import utcnow
from corral.lru import Lru
from corral.store import Store
from corral.store import channels as rows

log = logging.getLogger(__name__)

# Kept between our calls beyond what the platform asks, for clocks that differ a little.
CHAT_MARGIN_S = 0.01
GLOBAL_WINDOW_S = 1.1
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 60.0
MAX_IN_FLIGHT = 8
Clock = Callable[[], float]


class Window:
    """At most ``limit`` calls in any ``span`` seconds. A call counts from when it is sent, and
    once answered, from when it was answered instead: the platform saw it somewhere between,
    so the window is never narrower than the platform's."""

    def __init__(self, limit: float, span: float):
        self.limit = max(1, int(limit))
        self.span = span
        self._times: list[float] = []  # sorted
        self.paused_until = 0.0

    def next_free(self, now: float) -> float:
        cut = bisect.bisect_right(self._times, now - self.span)
        if cut:
            del self._times[:cut]
        at = self.paused_until
        if len(self._times) >= self.limit:
            at = max(at, self._times[0] + self.span)
        return at

    def take(self, now: float) -> None:
        bisect.insort(self._times, now)

    def answered(self, sent: float, now: float) -> None:
        index = bisect.bisect_left(self._times, sent)
        if index < len(self._times) and self._times[index] == sent:
            del self._times[index]
        bisect.insort(self._times, now)

    def spare(self, now: float) -> int:
        self.next_free(now)
        return self.limit - len(self._times)


def delivery_of(row: Any) -> Delivery:
    return Delivery(row.key, row.chat_id, row.thread_id, row.kind, row.text, row.target, dict(row.extra or {}),
                    row.attempts, row.created_at)


def row_of(channel: str, delivery: Delivery) -> dict[str, Any]:
    return {"channel": channel, "key": delivery.key, "chat_id": delivery.chat_id, "thread_id": delivery.thread_id,
            "kind": delivery.kind, "target": delivery.target, "text": delivery.text, "extra": delivery.extra or None,
            "created_at": delivery.created_at}


class Outbox:
    def __init__(self, store: Store, channel: str, limits: PlatformLimits, *, max_age_s: float = 86_400.0,
                 clock: Clock | None = None):
        self.store = store
        self.channel = channel
        self.limits = limits
        self.max_age_s = max_age_s
        self._clock = clock or asyncio.get_running_loop().time
        # chat -> its rows not yet sent, oldest first. A chat's key is its chat id; a button
        # acknowledgement goes in a queue of its own, so it never waits behind a reply.
        self._queues: dict[str, deque[Delivery]] = {}
        self._in_flight: set[str] = set()  # chats with a call under way (one at a time per chat)
        self._chat_next: dict[str, float] = {}  # a chat's next call, not before
        self._global = Window(limits.global_per_s, GLOBAL_WINDOW_S)
        self._picked_at = 0.0  # when _pick last chose a chat (its call's place in the global window)
        self._wake = asyncio.Event()
        self._drained: list[asyncio.Future[None]] = []
        # Platform ids of sent messages by row key, for edits (older ones are read from the store).
        self._sent_ids: Lru[str, str] = Lru(10_000)
        # What each message (by its send's key) was last given, so an edit to the same text is
        # recorded without a call.
        self._shown: Lru[str, str] = Lru(10_000)
        self.unchanged = 0
        self.sent = 0
        self.failed = 0
        self.retries = 0
        self.rate_limited = 0
        self.superseded = 0

    def __repr__(self) -> str:
        return (f"<Outbox {self.channel} pending={self.depth} in_flight={len(self._in_flight)} sent={self.sent} "
                f"failed={self.failed}>")

    @property
    def depth(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    # --- taking rows -----------------------------------------------------------------------

    async def load(self) -> int:
        """Queue every row still pending in the store (after a start); how many."""
        pending = await self.store.read(rows.pending_outbox, self.channel)
        for row in pending:
            self._queue(delivery_of(row))
        self._wake.set()
        return len(pending)

    async def put(self, deliveries: Sequence[Delivery], *, also: Callable[[Any], None] | None = None) -> list[Delivery]:
        """Write the rows (those whose key is new) and ``also`` in one transaction, then queue
        what was new. Returns it; a row whose key was there already is neither written nor queued."""
        channel = self.channel

        def unit(conn: Any) -> list[str]:
            added = rows.add_outbox(conn, [row_of(channel, d) for d in deliveries])
            if also is not None:
                also(conn)
            return added

        added = set(await self.store.write(unit))
        fresh = [d for d in deliveries if d.key in added]
        for delivery in fresh:
            self._queue(delivery)
        if fresh:
            self._wake.set()
        return fresh

    def _queue(self, delivery: Delivery) -> None:
        lane = f"answer:{delivery.chat_id}" if delivery.kind == "answer" else delivery.chat_id
        self._queues.setdefault(lane, deque()).append(delivery)

    # --- the sender ------------------------------------------------------------------------

    def spare(self) -> int:
        """Calls the global limit still allows this second (a typing indicator takes one only
        when some are spare)."""
        return self._global.spare(self._clock())

    def take_spare(self) -> bool:
        now = self._clock()
        if self._global.spare(now) <= self._global.limit // 2:
            return False
        self._global.take(now)
        return True

    async def run(self, platform: Platform) -> None:
        """Send until cancelled. A call the platform refuses the token for ends it (``AuthRejected``
        reaches the channel, which restarts); every other failure is the row's."""
        async with asyncio.TaskGroup() as group:
            while True:
                lane, wait = self._pick()
                if lane is not None:
                    self._in_flight.add(lane)
                    group.create_task(self._deliver(platform, lane, self._picked_at))
                    continue
                self._wake.clear()
                if wait is None:
                    await self._wake.wait()
                else:
                    try:
                        async with asyncio.timeout(max(wait, 0.001)):
                            await self._wake.wait()
                    except TimeoutError:
                        pass

    def _pick(self) -> tuple[str | None, float | None]:
        """The chat to serve now, or how long until one may be served (None: nothing queued)."""
        now = self._clock()
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return None, None
        global_at = self._global.next_free(now)
        best: tuple[bool, float] | None = None
        chosen: str | None = None
        soonest: float | None = None
        for lane, queue in self._queues.items():
            if lane in self._in_flight:
                continue
            self._drop_stale(queue)
            if not queue:
                continue
            head = queue[0]
            at = max(head.due, global_at, 0.0 if head.kind == "answer" else self._chat_next.get(lane, 0.0))
            if at > now:
                soonest = at if soonest is None else min(soonest, at)
                continue
            rank = (head.interim, at)
            if best is None or rank < best:
                best, chosen = rank, lane
        if chosen is not None:
            self._global.take(now)
            self._picked_at = now
            return chosen, None
        return None, None if soonest is None else soonest - now

    async def _deliver(self, platform: Platform, lane: str, began: float) -> None:
        queue = self._queues[lane]
        delivery = queue[0]
        try:
            merged = self._merge(queue, delivery)
            message = delivery.target if delivery.kind == "edit" else delivery.key
            if delivery.kind == "edit" and self._shown.get(message or "") == delivery.text and not (
                    delivery.extra.get("final") and platform.wants_final):
                await self._finish(lane, [delivery.key], rows.SENT)
                self.unchanged += 1
                return
            target_id = await self._target_id(delivery) if delivery.kind == "edit" else None
            if delivery.kind == "edit" and target_id is None:
                raise Rejected(f"the message {delivery.target} it edits was never delivered")
            try:
                platform_id = await platform.deliver(delivery, target_id)
            finally:
                # The platform got the call at some moment before its answer: the chat's next call
                # waits the interval from the answer, so no two reach it closer than that.
                answered = self._clock()
                self._global.answered(began, answered)
                if delivery.kind != "answer":
                    self._chat_next[lane] = answered + self.limits.chat_interval_s + CHAT_MARGIN_S
            if platform_id is not None and delivery.kind == "send":
                self._sent_ids.put(delivery.key, platform_id)
            if message is not None and delivery.kind != "answer":
                self._shown.put(message, delivery.text)
            await self._finish(lane, [delivery.key], rows.SENT, platform_id=platform_id,
                               superseded=[d.key for d in merged])
            self.sent += 1
            self.superseded += len(merged)
        except RetryAfter as exc:
            self.rate_limited += 1
            delivery.attempts += 1
            delivery.due = self._clock() + exc.retry_after
            if exc.whole_channel:
                self._global.paused_until = delivery.due
            self._chat_next[lane] = max(self._chat_next.get(lane, 0.0), delivery.due)
            self._note(delivery, str(exc))
        except Transient as exc:
            self.retries += 1
            delivery.attempts += 1
            if (utcnow() - delivery.created_at).total_seconds() > self.max_age_s:
                await self._give_up(lane, delivery, f"gave up after {delivery.attempts} attempts: {exc}")
            else:
                backoff = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (delivery.attempts - 1))
                delivery.due = self._clock() + backoff * random.uniform(0.8, 1.0)
                self._note(delivery, str(exc))
        except Rejected as exc:
            await self._give_up(lane, delivery, str(exc))
        finally:
            self._in_flight.discard(lane)
            if not queue:
                self._queues.pop(lane, None)
            self._wake.set()
            if not self._in_flight and not self._queues:
                for waiter in self._drained:
                    if not waiter.done():
                        waiter.set_result(None)

    async def wait_drained(self) -> None:
        """Until nothing is queued or in flight (every row written so far is sent or failed)."""
        if not self._in_flight and not any(self._queues.values()):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drained.append(waiter)
        try:
            await waiter
        finally:
            self._drained.remove(waiter)

    def _drop_stale(self, queue: deque[Delivery]) -> None:
        """Take off the head of a chat's queue the edits a later edit of the same message makes
        stale: never worth a call. Marked ``superseded`` without waiting (were the mark lost, a
        restart would send a stale edit just before the newer one: a wasted call, nothing worse)."""
        stale: list[str] = []
        while queue and queue[0].kind == "edit" and any(
                d.kind == "edit" and d.target == queue[0].target for d in list(queue)[1:]):
            stale.append(queue.popleft().key)
        if stale:
            self.superseded += len(stale)
            channel = self.channel
            self.store.emit_unit(lambda conn: rows.mark_outbox(conn, channel, stale, status=rows.SUPERSEDED))

    def _merge(self, queue: deque[Delivery], delivery: Delivery) -> list[Delivery]:
        """A send takes the newest text queued for its message; the edits it makes needless."""
        if delivery.kind != "send":
            return []
        edits = [d for d in list(queue)[1:] if d.kind == "edit" and d.target == delivery.key]
        if edits:
            newest = edits[-1]
            delivery.text = newest.text
            if "buttons" in newest.extra or "final" in newest.extra:
                delivery.extra = {**delivery.extra, **{k: v for k, v in newest.extra.items() if k != "interim"}}
        return edits

    async def _target_id(self, delivery: Delivery) -> str | None:
        assert delivery.target is not None
        known = self._sent_ids.get(delivery.target)
        if known is not None:
            return known
        row = await self.store.read(rows.outbox_row, self.channel, delivery.target)
        if row is None or row.status != rows.SENT:
            return None
        return str(row.platform_id) if row.platform_id is not None else delivery.target

    async def _finish(self, lane: str, keys: list[str], status: str, *, platform_id: str | None = None,
                      superseded: Sequence[str] = ()) -> None:
        """Record the outcome before the chat's next row goes (so a restart never repeats it),
        then take the row and any it made needless off the queue."""
        channel, now = self.channel, utcnow()

        def unit(conn: Any) -> None:
            rows.mark_outbox(conn, channel, keys, status=status, platform_id=platform_id,
                             sent_at=now if status == rows.SENT else None)
            if superseded:
                rows.mark_outbox(conn, channel, superseded, status=rows.SUPERSEDED)

        await self.store.write(unit)
        queue = self._queues.get(lane)
        if queue is not None:
            gone = set(keys) | set(superseded)
            remaining = [d for d in queue if d.key not in gone]
            queue.clear()
            queue.extend(remaining)

    async def _give_up(self, lane: str, delivery: Delivery, error: str) -> None:
        self.failed += 1
        log.warning("channel %s: delivery %s failed: %s", self.channel, delivery.key, error)
        channel, key, attempts = self.channel, delivery.key, delivery.attempts

        def unit(conn: Any) -> None:
            rows.mark_outbox(conn, channel, [key], status=rows.FAILED, error=error[:2000], attempts=attempts)

        await self.store.write(unit)
        queue = self._queues.get(lane)
        if queue and queue[0] is delivery:
            queue.popleft()

    def _note(self, delivery: Delivery, error: str) -> None:
        """Keep a retried row's attempts and last error in the store (for a look at the outbox),
        without waiting: the row stays pending whatever becomes of this write."""
        channel, key, attempts = self.channel, delivery.key, delivery.attempts
        self.store.emit_unit(lambda conn: rows.mark_outbox(conn, channel, [key], attempts=attempts,
                                                           error=error[:2000]))

    def statistics(self) -> dict[str, int]:
        return {"pending": self.depth, "in_flight": len(self._in_flight), "sent": self.sent, "failed": self.failed,
                "retries": self.retries, "rate_limited": self.rate_limited, "superseded": self.superseded,
                "unchanged": self.unchanged}


def age_cutoff(days: float) -> Any:
    return utcnow() - timedelta(days=days)
