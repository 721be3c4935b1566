"""Faults on cue: the real store, with its named operations refusing writes when told to."""

from __future__ import annotations

import asyncio
from typing import Any

from corral.errors import StoreUnavailable
from corral.records import Writes
from corral.store import Store


class FlakyStore(Store):
    """The real store, whose named operations can be told to fail their next N writes."""

    def __init__(self, url: str):
        super().__init__(url)
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
