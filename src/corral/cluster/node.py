"""This process as a node of a cluster: its row, its lease, and the heartbeat that renews it.

The heartbeat runs on a thread of its own with its own connection, never on the event
loop: a loop busy with a thousand runs (or a long GC pause) must not look like a dead
node to the others, and a dead node must not look alive because its loop still turns
(LangGraph's runtime refreshes its liveness from the busy loop, and re-runs live runs).

The lease is kept on both sides. The database's side: a heartbeat older than
``lease_ttl_s`` lets another node take the sessions over, and then every commit of this
node's writer is refused (``store.nodes.check_fence``). This node's side: if it cannot
renew before its lease runs out (a partition, a paused process) it refuses to commit at
once (``holds_lease``), without waiting to learn that it was taken over.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from corral.errors import Fenced
from corral.types import new_id

log = logging.getLogger(__name__)

RENEW = "UPDATE nodes SET heartbeat_at = now() WHERE id = $1 AND state = 'live' RETURNING 1"


def asyncpg_dsn(database_url: str) -> str:
    """The driver's own form of a ``postgresql+asyncpg://`` URL."""
    return "postgresql://" + database_url.split("://", 1)[1]


class Node:
    def __init__(self, url: str, database_url: str, *, lease_ttl_s: float, heartbeat_s: float,
                 on_fenced: Callable[[], None]):
        self.id = new_id("node")
        self.url = url.rstrip("/")
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_s = heartbeat_s
        self._dsn = asyncpg_dsn(database_url)
        self._on_fenced = on_fenced
        # Monotonic time until which this node may commit: a renewal sent at t extends it to
        # t + lease_ttl_s (measured from the send, so it never overestimates). Written by the
        # heartbeat thread, read by the writer's: a float assignment is atomic.
        self.lease_until = time.monotonic() + lease_ttl_s
        self.renewals = 0
        self.fenced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        state = "fenced" if self.fenced else ("leased" if self.holds_lease() else "lease lost")
        return f"<Node {self.id} {self.url} {state} renewals={self.renewals}>"

    def holds_lease(self) -> bool:
        return not self.fenced and time.monotonic() < self.lease_until

    def check_lease(self) -> None:
        """Raise ``Fenced`` unless this node may commit (the writer calls it before each batch)."""
        if not self.holds_lease():
            raise Fenced(f"node {self.id} could not renew its lease: it commits nothing until it is sure of it")

    def start(self) -> None:
        """Start heartbeating (after the node's row exists)."""
        self._loop = asyncio.get_running_loop()
        self.lease_until = time.monotonic() + self.lease_ttl_s
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)

    def _run(self) -> None:
        asyncio.run(self._beat())

    async def _beat(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # the driver the store's Postgres engine loads anyway

        conn = None
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self._dsn, timeout=self.heartbeat_s)
                renewed = await conn.fetchval(RENEW, self.id, timeout=self.heartbeat_s)
            except Exception as exc:  # unreachable for now: the lease runs down, and then the writer stops
                log.warning("node %s: heartbeat failed: %s", self.id, exc)
                if conn is not None:
                    conn.terminate()
                    conn = None
            else:
                if renewed:
                    self.lease_until = sent + self.lease_ttl_s
                    self.renewals += 1
                else:
                    self._fenced()
                    break
            slept = 0.0
            while slept < self.heartbeat_s and not self._stop.is_set():  # stop() is told within 50 ms
                await asyncio.sleep(0.05)
                slept += 0.05
        if conn is not None:
            await conn.close()

    def _fenced(self) -> None:
        log.error("node %s was taken over by another node (its lease ran out): it stops", self.id)
        self.fenced = True
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._on_fenced)
            except RuntimeError:
                pass  # the loop closed meanwhile: the process is on its way out anyway
