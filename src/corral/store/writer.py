"""The single writer: every write goes through one connection, in group commits.

Why one writer: SQLite allows one writer at a time, and connections fighting for its
lock collapse throughput (DESIGN.md section 5). Batching many callers' writes into one
transaction pays one commit for all of them. Postgres gets the same treatment, which
keeps the per-session event order trivially equal to the commit order.

Contract:
- ``submit`` is synchronous and FIFO: units commit in the order they were submitted.
- A unit's operations and its events commit in one transaction, all or nothing. A batch
  merges its units' operations into one statement per kind (``corral.store.ops``).
- Events get their per-session ``seq`` here, at commit time, so a failed unit can
  never leave a gap.
- ``on_commit`` sees each batch's events only after the commit returned: an observer
  never sees an event that could still be rolled back.
- Batches are applied by synchronous code on the writer's lane (its thread on SQLite;
  see ``engine``): one hand-off drains every unit pending, batch after batch, without
  waiting for a turn of the event loop in between; outcomes are posted back in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.errors import ShuttingDown, StoreUnavailable
from corral.events import Event, NewEvent
from corral.store import ops as o
from corral.store import tables as t
from corral.store.engine import Lane

log = logging.getLogger(__name__)

WriteFn = o.WriteFn
Unit = WriteFn | Sequence[o.Op] | None
CommitHook = Callable[[list[Event]], None]


# Turns a driver's exception into the one the unit's submitter expects (see ``Store``).
Translate = Callable[[Exception], Exception]


@dataclass(slots=True)
class _Unit:
    ops: list[o.Op]
    events: list[NewEvent]
    future: asyncio.Future[Any]
    committed: list[Event] = field(default_factory=list)
    result: Any = None
    translate: Translate | None = None


def _as_ops(unit: Unit, holder: list[_Unit]) -> list[o.Op]:
    if unit is None:
        return []
    if callable(unit):
        fn = unit

        def call(conn: Connection) -> None:
            holder[0].result = fn(conn)

        return [o.Call(call)]
    return list(unit)


class Writer:
    """Owns the write lane and commits submitted units in batches."""

    def __init__(self, lane: Lane, on_commit: CommitHook, *, max_batch: int = 1024):
        self._lane = lane
        self._on_commit = on_commit
        self._max_batch = max_batch
        # Units wait here until the lane takes them: appended on the event loop, popped on the
        # writer's lane (a deque's append and popleft are atomic, so no lock is needed).
        self._pending: deque[_Unit] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        # Set when the writer task is cancelled: the lane stops after the batch in hand.
        self._stopping = False
        # session id -> next event seq; authoritative because this writer is the
        # only one appending events for the sessions this process owns. Only the lane
        # (one thread, or the writer task's greenlet) touches it.
        self._next_seq: dict[str, int] = {}
        self.batches = 0
        self.units = 0
        # Told (units, seconds) after each committed batch: the metrics' group-commit view.
        self.batch_hook: Callable[[int, float], None] | None = None
        # In a cluster: run first in every batch's transaction, raising to refuse the whole batch
        # (a fenced node commits nothing); and, after each commit, told the sessions whose events
        # it carried, with their seq ranges (the wake-up hints other nodes' observers follow). Both
        # on the writer's lane.
        self.fence: Callable[[Connection], None] | None = None
        self.after_commit: Callable[[Connection, dict[str, tuple[int, int]]], None] | None = None
        # Told, on the loop, the outcome of every commit attempted: None for a committed batch,
        # the driver's exception for a unit that failed (the store's write health, ``health``).
        self.outcome_hook: Callable[[Exception | None], None] | None = None
        # Told, on the loop, the messages each committed batch inserted (rows with their ids, in
        # id order), before its units resolve: ``kernel.conversations`` keeps them.
        self.messages_hook: Callable[[list[dict[str, Any]]], None] | None = None
        # While set (to why), every unit submitted fails at once with ``StoreUnavailable``, without
        # reaching the database, unless submitted with ``gated=False`` (a cluster node that has
        # not joined yet).
        self.gate: str | None = None

    def __repr__(self) -> str:
        return f"<Writer pending={len(self._pending)} batches={self.batches} units={self.units}>"

    def submit(
        self, unit: Unit, events: list[NewEvent] | None = None, *, translate: Translate | None = None,
        gated: bool = True,
    ) -> asyncio.Future[Any]:
        """Queue a unit (operations, or a function of the connection) with its events.

        The future resolves once committed: to the function's result, or None. If the unit
        fails, the future holds the driver's exception, or ``translate(exception)``; while the
        ``gate`` is set, it holds ``StoreUnavailable`` at once (unless ``gated`` is False).
        """
        if self._closing:
            raise ShuttingDown("the store is closed for writes")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if gated and self.gate is not None:
            future.set_exception(StoreUnavailable(self.gate))
            return future
        holder: list[_Unit] = []
        entry = _Unit(_as_ops(unit, holder), list(events or ()), future, translate=translate)
        holder.append(entry)
        self._pending.append(entry)
        self._wakeup.set()
        return future

    async def write(self, unit: Unit, events: list[NewEvent] | None = None) -> Any:
        return await self.submit(unit, events)

    def emit(self, events: list[NewEvent]) -> None:
        """Append events without waiting; a failure is logged (and the seq is not used)."""
        future = self.submit(None, events)
        future.add_done_callback(_log_failure)

    async def run(self, started: asyncio.Event | None = None) -> None:
        """The writer loop; returns once ``close`` was called and every unit is done."""
        loop = asyncio.get_running_loop()
        await self._lane.run(_reachable)  # a database that cannot be reached fails the start, not the first write
        if started is not None:
            started.set()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            drain = asyncio.ensure_future(self._lane.run(lambda conn: self._drain(conn, loop)))
            try:
                await asyncio.shield(drain)
            except asyncio.CancelledError:
                # The batch in hand still commits (or not) and reports its real outcome, never
                # "failed" for a commit that happened; what is left behind it fails.
                self._stopping = True
                drain.add_done_callback(lambda _: self._fail_pending(ShuttingDown("the writer was stopped")))
                raise
            except Exception as exc:
                # The lane could not run at all (no connection to the database): the units
                # waiting fail with its error, and the next submit tries again.
                log.error("the writer could not reach the database", exc_info=exc)
                self._fail_pending(exc)

    def reset_seq(self, session_id: str) -> None:
        """Forget the next seq of a session that another node may have written to (one this node
        has just taken over). On the writer's lane only: from within a unit's function."""
        self._next_seq.pop(session_id, None)

    def close(self) -> None:
        """Refuse new units; the loop finishes what is queued and returns."""
        self._closing = True
        self._wakeup.set()

    def _drain(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer's lane: commit batch after batch until nothing is pending.

        The lane does not wait for a turn of the event loop between batches (a busy loop's
        turn takes milliseconds): each outcome is posted back, in commit order, and the
        next batch starts at once.
        """
        while self._pending and not self._stopping:
            batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            self._commit(conn, batch, loop)

    def _commit(self, conn: Connection, batch: list[_Unit], loop: asyncio.AbstractEventLoop) -> None:
        began = time.perf_counter()
        saved = dict(self._next_seq)
        try:
            messages = self._apply(conn, batch)
        except Exception as exc:
            self._next_seq = saved
            if len(batch) == 1:
                _post(loop, self._failed, batch[0], exc)
                return
            # One bad unit must not fail its neighbours: retry each on its own.
            log.debug("batch of %d failed; retrying units one by one", len(batch), exc_info=exc)
            for unit in batch:
                self._commit(conn, [unit], loop)
            return
        _post(loop, self._committed, batch, time.perf_counter() - began, messages)

    def _committed(self, batch: list[_Unit], seconds: float, messages: list[dict[str, Any]]) -> None:
        """On the loop, after the commit: count, publish, resolve, in that order."""
        self.batches += 1
        self.units += len(batch)
        if self.batch_hook is not None:
            self.batch_hook(len(batch), seconds)
        if self.outcome_hook is not None:
            self.outcome_hook(None)
        if messages and self.messages_hook is not None:
            try:
                self.messages_hook(messages)
            except Exception:  # a listener's bug must never leave the batch's writes unresolved
                log.exception("a listener of committed messages failed")
        self._publish([event for unit in batch for event in unit.committed])
        for unit in batch:
            if not unit.future.done():
                unit.future.set_result(unit.result)

    def _failed(self, unit: _Unit, error: Exception) -> None:
        if self.outcome_hook is not None:
            self.outcome_hook(error)
        if not unit.future.done():
            unit.future.set_exception(unit.translate(error) if unit.translate is not None else error)

    def _fail_pending(self, error: Exception) -> None:
        while self._pending:
            self._failed(self._pending.popleft(), error)

    def _apply(self, conn: Connection, batch: list[_Unit]) -> list[dict[str, Any]]:
        """The whole batch, on the writer's lane: one transaction, all or nothing; returns the
        messages it inserted (``ops.apply``)."""
        with conn.begin():
            if self.fence is not None:
                self.fence(conn)
            messages = o.apply(conn, [op for unit in batch for op in unit.ops])
            rows = self._number_events(conn, batch)
            if rows:
                conn.execute(t.events.insert(), rows)
        if rows and self.after_commit is not None:
            try:
                self.after_commit(conn, _seq_ranges(rows))
            except Exception:  # a hint is only a hint: observers elsewhere also poll
                log.warning("could not send the wake-up hints of a commit", exc_info=True)
        return messages

    def _number_events(self, conn: Connection, batch: list[_Unit]) -> list[dict[str, Any]]:
        unknown = {e.session_id for u in batch for e in u.events if e.session_id not in self._next_seq}
        if unknown:
            query = (
                sa.select(t.events.c.session_id, sa.func.max(t.events.c.seq))
                .where(t.events.c.session_id.in_(unknown))
                .group_by(t.events.c.session_id)
            )
            found = {sid: top for sid, top in conn.execute(query).all()}
            for sid in unknown:
                self._next_seq[sid] = (found.get(sid) or 0) + 1
        rows: list[dict[str, Any]] = []
        for unit in batch:
            unit.committed = []
            for new in unit.events:
                seq = self._next_seq[new.session_id]
                self._next_seq[new.session_id] = seq + 1
                event = Event(new.session_id, seq, new.type.value, new.run_id, new.data, new.ts)
                unit.committed.append(event)
                rows.append(event.row())
        return rows

    def _publish(self, events: list[Event]) -> None:
        if events:
            self._on_commit(events)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand an outcome to the event loop; a loop already closed has no one left to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        log.debug("the event loop closed before a write's outcome could be reported")


def _seq_ranges(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Each session's first and last event seq in a committed batch."""
    ranges: dict[str, tuple[int, int]] = {}
    for row in rows:
        sid, seq = row["session_id"], row["seq"]
        first, last = ranges.get(sid, (seq, seq))
        ranges[sid] = (min(first, seq), max(last, seq))
    return ranges


def _reachable(conn: Connection) -> None:
    conn.exec_driver_sql("SELECT 1")


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("event append failed", exc_info=future.exception())
