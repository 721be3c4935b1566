"""A model-call slot with two classes of waiter: interactive work goes before background work.

Background runs (scheduled fires) share an agent's ``max_concurrent_calls`` with people, but
never take a freed slot while a person's run waits for one. Within a class, first come,
first served.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType


class PrioritySlot:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        # Invariant: a waiter exists only while in_use == limit (a free slot goes to the queue head).
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}

    def __repr__(self) -> str:
        return (f"<PrioritySlot {self.in_use}/{self.limit} in use, waiting: "
                f"{len(self._waiting[False])} interactive, {len(self._waiting[True])} background>")

    def locked(self) -> bool:
        """True when no slot is free (as ``asyncio.Semaphore.locked``)."""
        return self.in_use >= self.limit

    async def __aenter__(self) -> None:
        await self.acquire(background=False)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        await self.acquire(background=True)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, *, background: bool) -> None:
        ahead = self._waiting[False] if background else ()
        if self.in_use < self.limit and not ahead and not self._waiting[background]:
            self.in_use += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[background].append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self._waiting[background].remove(granted)
            raise

    def release(self) -> None:
        for queue in (self._waiting[False], self._waiting[True]):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot moves to the waiter: in_use is unchanged
                    return
        self.in_use -= 1
