"""Whether this node should take traffic, and start-up work the store refused for now.

Starting reads what the store holds and writes what that implies: a cluster node's join,
configured agents not stored yet, the recovery of runs a crash left running. On a store that
refuses writes (a full disk, a database that takes no writes) exiting would turn "no writes"
into "no reads either", so each such write is tried once as the kernel starts and, if the
store is unavailable, deferred: finished in the background, with backoff, until it commits
(the repair rule, ``repair.py``), while what depends on it is held (a session whose recovery
waits refuses new inputs with 503 and Retry-After; a node that has not joined commits nothing).

Readiness (``GET /readyz``) is the list of reasons not to send this node traffic: the store's
last write failed (``Store.health``, kept by the writer at no cost), start-up work is pending,
sessions are repairing a write, or the service is stopping. What keeps the store's state
fresh without any client writing:

- while the last write failed, the store watch probes with a small write of its own, with
  the repair rule's backoff, until one commits (so "space returned" is noticed by itself);
- when a readiness check finds no write attempted for ``FRESH_S``, it probes once (one at a
  time, waited for at most ``PROBE_WAIT_S``), so an idle node whose disk filled up says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from corral.errors import StoreUnavailable

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel

log = logging.getLogger(__name__)

# A readiness check older than this since the last write attempt probes the store first.
FRESH_S = 5.0
# How long a readiness check waits for that probe before it answers with what it knows.
PROBE_WAIT_S = 1.0


class Readiness:
    def __init__(self, kernel: Kernel):
        self._k = kernel
        # Start-up work deferred until the store takes writes: task -> its kind.
        self._deferred: dict[asyncio.Task[None], str] = {}
        self._probe: asyncio.Task[bool] | None = None

    def __repr__(self) -> str:
        return f"<Readiness deferred={len(self._deferred)} {self._k.store.health!r}>"

    # --- start-up work the store refused --------------------------------------------------

    def defer(self, kind: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (which retries its own write) in the background as pending start-up
        work of ``kind``; readiness waits for it. Cancelled at shutdown: the next start does it."""
        task = self._k.supervisor.spawn(work, f"start-up:{kind}")
        self._deferred[task] = kind
        task.add_done_callback(lambda done: self._deferred.pop(done, None))

    def retry(self, kind: str, attempt: Callable[[], Awaitable[None]]) -> None:
        """Defer ``attempt``, called again with the repair rule's backoff for as long as it raises
        ``StoreUnavailable``."""
        self.defer(kind, self._retry(kind, attempt))

    async def _retry(self, kind: str, attempt: Callable[[], Awaitable[None]]) -> None:
        config = self._k.config
        delay, tries = config.write_retry_min_s, 0
        while True:
            await asyncio.sleep(delay)
            try:
                await attempt()
            except StoreUnavailable as exc:
                tries += 1
                if tries & (tries - 1) == 0:  # 1, 2, 4, 8...: a long outage does not flood the log
                    log.warning("start-up: %s still waits for the store (attempt %d): %s", kind, tries, exc)
                delay = min(delay * 2, config.write_retry_max_s)
                continue
            log.info("start-up: %s done, the store takes writes again", kind)
            return

    @property
    def pending(self) -> Counter[str]:
        """Start-up work still deferred, counted by kind."""
        return Counter(self._deferred.values())

    async def stop(self) -> None:
        """At shutdown: deferred work is dropped (nothing of it committed; the next start redoes it)."""
        tasks = list(self._deferred)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()

    # --- the store's state ---------------------------------------------------------------

    async def watch_store(self) -> None:
        """The kernel's service: while the store's last write failed, probe it with backoff until
        a write commits (a probe, or anyone else's)."""
        health, config = self._k.store.health, self._k.config
        while True:
            await health.failing.wait()
            delay = config.write_retry_min_s
            while health.failing.is_set():
                await asyncio.sleep(delay)
                if health.failing.is_set() and time.monotonic() - health.last_attempt >= delay:
                    await self._k.store.probe()  # nobody else tried meanwhile
                delay = min(delay * 2, config.write_retry_max_s)

    async def check(self) -> list[str]:
        """Why this node should not take traffic now; empty when it should. Probes the store
        first if nothing tried a write for ``FRESH_S``."""
        health = self._k.store.health
        if not self._k.stopping.is_set() and time.monotonic() - health.last_attempt > FRESH_S:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._k.store.probe())
            await asyncio.wait([self._probe], timeout=PROBE_WAIT_S)
        return self.reasons()

    def reasons(self) -> list[str]:
        """Why this node should not take traffic, from what is known now (no I/O)."""
        k, reasons = self._k, []
        if k.stopping.is_set():
            reasons.append("stopping: the service is shutting down")
        health = k.store.health
        if health.writable is False:
            reasons.append(f"store: writes fail: {health.reason}")
        for kind, count in sorted(self.pending.items()):
            reasons.append(f"start-up: {kind} ({count}) waits for the store to take writes")
        repairing = sum(1 for runtime in k.sessions.all_live() if runtime.repairing)
        if repairing:
            reasons.append(f"repairing: {repairing} session(s) wait for a write to commit")
        return reasons

    @property
    def store_state(self) -> str:
        """``ok``, ``unwritable`` or ``unknown``: the store as ``/healthz`` shows it."""
        return self._k.store.health.state
