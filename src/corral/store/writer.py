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
- A batch is one synchronous function run in one hand-off on the writer's lane (its
  thread on SQLite; see ``engine``), so its cost does not grow with its statements.
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

from corral.errors import ShuttingDown
from corral.store import ops as o
from corral.store import tables as t
from corral.store.engine import Lane
from corral.store.events import Event, NewEvent

log = logging.getLogger(__name__)

WriteFn = o.WriteFn
Unit = WriteFn | Sequence[o.Op] | None
CommitHook = Callable[[list[Event]], None]


@dataclass(slots=True)
class _Unit:
    ops: list[o.Op]
    events: list[NewEvent]
    future: asyncio.Future[Any]
    committed: list[Event] = field(default_factory=list)
    result: Any = None


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
        # Units wait here until the loop takes them; only the loop pops.
        self._pending: deque[_Unit] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        # session id -> next event seq; authoritative because this writer is the
        # only one appending events for the sessions this process owns.
        self._next_seq: dict[str, int] = {}
        self.batches = 0
        self.units = 0
        # Told (units, seconds) after each committed batch: the metrics' group-commit view.
        self.batch_hook: Callable[[int, float], None] | None = None

    def __repr__(self) -> str:
        return f"<Writer pending={len(self._pending)} batches={self.batches} units={self.units}>"

    def submit(self, unit: Unit, events: list[NewEvent] | None = None) -> asyncio.Future[Any]:
        """Queue a unit (operations, or a function of the connection) with its events.

        The future resolves once committed: to the function's result, or None.
        """
        if self._closing:
            raise ShuttingDown("the store is closed for writes")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        holder: list[_Unit] = []
        entry = _Unit(_as_ops(unit, holder), list(events or ()), future)
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
            batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            await self._commit(batch)

    def close(self) -> None:
        """Refuse new units; the loop finishes what is queued and returns."""
        self._closing = True
        self._wakeup.set()

    async def _commit(self, batch: list[_Unit]) -> None:
        began = time.perf_counter()
        error = await self._attempt(batch)
        if error is None:
            if self.batch_hook is not None:
                self.batch_hook(len(batch), time.perf_counter() - began)
            self._done(batch)
        elif len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
        else:
            # One bad unit must not fail its neighbours: retry each on its own.
            log.debug("batch of %d failed; retrying units one by one", len(batch), exc_info=error)
            for unit in batch:
                await self._commit([unit])

    async def _attempt(self, batch: list[_Unit]) -> Exception | None:
        """Run the batch in one hand-off; the error that rolled it back, or None once committed."""
        saved = dict(self._next_seq)
        job = asyncio.ensure_future(self._lane.run(lambda conn: self._apply(conn, batch)))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # The batch may still commit on the writer's thread: its units learn the real
            # outcome when it is known, never "failed" for a commit that happened.
            job.add_done_callback(lambda _: self._settle_late(batch, job))
            raise
        except Exception as exc:
            self._next_seq = saved
            return exc
        return None

    def _settle_late(self, batch: list[_Unit], job: asyncio.Future[None]) -> None:
        if job.cancelled() or job.exception() is not None:
            for unit in batch:
                if not unit.future.done():
                    unit.future.set_exception(ShuttingDown("the writer was stopped"))
        else:
            self._done(batch)

    def _done(self, batch: list[_Unit]) -> None:
        self.batches += 1
        self.units += len(batch)
        self._publish([event for unit in batch for event in unit.committed])
        for unit in batch:
            if not unit.future.done():
                unit.future.set_result(unit.result)

    def _apply(self, conn: Connection, batch: list[_Unit]) -> None:
        """The whole batch, on the writer's lane: one transaction, all or nothing."""
        with conn.begin():
            o.apply(conn, [op for unit in batch for op in unit.ops])
            rows = self._number_events(conn, batch)
            if rows:
                conn.execute(t.events.insert(), rows)

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


def _reachable(conn: Connection) -> None:
    conn.exec_driver_sql("SELECT 1")


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("event append failed", exc_info=future.exception())
