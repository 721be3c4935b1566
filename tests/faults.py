"""Faults on cue: the real store, with its named operations refusing writes when told to, or
every commit failing as on a full disk."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from corral.errors import StoreUnavailable
from corral.records import Writes
from corral.store import Store
from corral.store.writer import Writer, _Unit


class _DiskWriter(Writer):
    """The real writer, on a disk that can fill up: while ``full``, every batch fails as the
    driver fails it when the database cannot grow (reads, and migrating, are untouched)."""

    full = False

    def _apply(self, conn: Connection, batch: list[_Unit]) -> list[dict[str, Any]]:
        if self.full:
            raise sa_exc.OperationalError("COMMIT", None, OSError(28, "database or disk is full"))
        return super()._apply(conn, batch)


class FlakyStore(Store):
    """The real store, whose named operations can be told to fail their next N writes, and whose
    disk can fill up (``fill_disk``: every write of the writer fails until ``free_disk``)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.writer = _DiskWriter(self._write_lane, self._dispatch)
        self.writer.outcome_hook = self._write_outcome
        self.failures: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.error: type[Exception] = StoreUnavailable
        # Set at each refused write, so a test can act while the store is "down".
        self.refusing = asyncio.Event()

    def fail(self, operation: str, times: int = 1_000_000, error: type[Exception] = StoreUnavailable) -> None:
        """Refuse the operation's next ``times`` writes (by default, until ``heal``)."""
        self.failures[operation] = times
        self.error = error

    def heal(self, operation: str) -> None:
        self.failures[operation] = 0

    def fill_disk(self) -> None:
        assert isinstance(self.writer, _DiskWriter)
        self.writer.full = True

    def free_disk(self) -> None:
        assert isinstance(self.writer, _DiskWriter)
        self.writer.full = False

    def _maybe_fail(self, operation: str, writes: Writes) -> asyncio.Future[Any]:
        if self.failures.get(operation, 0) > 0:
            self.failures[operation] -= 1
            self.refused[operation] = self.refused.get(operation, 0) + 1
            self.refusing.set()
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(self.error(f"injected: {operation} refused"))
            return future
        return getattr(super(), operation)(writes)  # type: ignore[no-any-return]

    def accept(self, writes: Writes) -> asyncio.Future[Any]:
        return self._maybe_fail("accept", writes)

    def begin_run(self, writes: Writes) -> asyncio.Future[Any]:
        return self._maybe_fail("begin_run", writes)

    def end_run(self, writes: Writes) -> asyncio.Future[Any]:
        return self._maybe_fail("end_run", writes)

    def record(self, writes: Writes) -> asyncio.Future[Any]:
        return self._maybe_fail("record", writes)
