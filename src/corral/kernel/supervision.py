"""Who owns the kernel's tasks: one root group, and a scope of its own for each unit of work.

Every run, agent start and repair is a task of the kernel's root ``TaskGroup``, so
stopping the kernel stops them all. But a task group cancels every member when one
fails, and one run's bug must never cancel another session's run: each task spawned
here runs in its own scope, where an exception is that unit's failure (logged and
handed to its ``on_error``), never the group's. Long-lived services are restarted
with backoff by ``supervise``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from corral.errors import ShuttingDown

CORO_CREATED = inspect.CORO_CREATED

log = logging.getLogger(__name__)

SERVICE_RESTART_MIN_S = 0.1
SERVICE_RESTART_MAX_S = 30.0

OnError = Callable[[Exception], None]


class Supervisor:
    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self.failures = 0  # units whose scope caught an exception (a bug somewhere, each logged)

    def __repr__(self) -> str:
        state = "open" if self._group is not None else "closed"
        return f"<Supervisor {state} failures={self.failures}>"

    def open(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def close(self) -> None:
        self._group = None

    @property
    def is_open(self) -> bool:
        return self._group is not None

    def spawn(
        self, coro: Coroutine[Any, Any, None], name: str, *, on_error: OnError | None = None
    ) -> asyncio.Task[None]:
        """Start ``coro`` in a scope of its own: an exception it raises goes to ``on_error``
        (after being logged), not to the group."""
        if self._group is None:
            coro.close()
            raise ShuttingDown("the kernel is not running")
        task = self._group.create_task(self._scope(coro, name, on_error), name=name)
        # Cancelled before its scope began, the unit itself never ran: close it, as a task of
        # its own would have been (else Python warns that it was never awaited).
        task.add_done_callback(lambda _: coro.close() if inspect.getcoroutinestate(coro) == CORO_CREATED else None)
        return task

    async def _scope(self, coro: Coroutine[Any, Any, None], name: str, on_error: OnError | None) -> None:
        try:
            await coro
        except Exception as exc:
            self.failures += 1
            log.exception("%s failed", name)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("handling the failure of %s failed too", name)

    async def supervise(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived service until it returns; restart it with backoff when it fails."""
        delay = SERVICE_RESTART_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await service()
                return
            except Exception:
                log.exception("service %s failed; restarting in %.1f s", name, delay)
            if loop.time() - began > SERVICE_RESTART_MAX_S:
                delay = SERVICE_RESTART_MIN_S  # it had been healthy for a while: start the backoff afresh
            await asyncio.sleep(delay)
            delay = min(delay * 2, SERVICE_RESTART_MAX_S)


async def wait_all(events: list[asyncio.Event], within: float) -> None:
    """Wait until every event is set, for at most ``within`` seconds."""
    pending = [asyncio.ensure_future(event.wait()) for event in events if not event.is_set()]
    if not pending:
        return
    _, not_done = await asyncio.wait(pending, timeout=within)
    for waiter in not_done:
        waiter.cancel()
