"""A node that leaves gracefully never mistakes its own exit for a takeover.

Leaving marks the node's row ``left``; a heartbeat that renews after that finds no live row,
which is exactly what a node that was taken over sees. The node must stop heartbeating
before it leaves, or a shutdown logs an error and fires the fencing callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from corral.cluster import membership_for
from corral.errors import StoreUnavailable
from corral.metrics import Metrics
from tests.cluster.harness import asyncpg_dsn, fresh_database
from tests.cluster.test_claims import stores

pytestmark = pytest.mark.postgres

T = TypeVar("T")


async def test_a_heartbeat_after_the_leave_is_not_taken_for_a_takeover(caplog: pytest.LogCaptureFixture) -> None:
    async with asyncio.timeout(30), fresh_database() as url, stores(url, 1) as (store,):
        fenced = asyncio.Event()
        membership = membership_for(store, Metrics(), url="http://127.0.0.1:9", database_url=url,
                                    lease_ttl_s=10.0, heartbeat_s=0.02, on_fenced=fenced.set)
        await membership.join()
        node = membership.node

        write = store.write

        async def write_then_let_the_heartbeat_beat(work: Callable[[Any], T], **options: Any) -> T:
            """Force the interleaving a shutdown can meet: once the leave has committed, the
            heartbeat (if it still runs) renews at least once more before ``leave`` goes on."""
            result = await write(work, **options)
            renewals = node.renewals
            thread = node._thread
            assert thread is not None
            while thread.is_alive() and node.renewals == renewals and not node.fenced:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return result

        store.write = write_then_let_the_heartbeat_beat  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="corral.cluster"):
            await membership.leave()

        assert not node.fenced and not fenced.is_set()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        db = await asyncpg.connect(asyncpg_dsn(url))
        try:
            assert await db.fetchval("SELECT state FROM nodes WHERE id = $1", node.id) == "left"
        finally:
            await db.close()


async def test_a_leave_the_store_refuses_does_not_stop_the_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """Its sessions then move as after a crash: the row stays live until the lease runs out."""
    async with asyncio.timeout(30), fresh_database() as url, stores(url, 1) as (store,):
        membership = membership_for(store, Metrics(), url="http://127.0.0.1:9", database_url=url,
                                    lease_ttl_s=10.0, heartbeat_s=0.02, on_fenced=lambda: None)
        await membership.join()
        node = membership.node

        async def refused(work: Any, *args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("the store could not write: database or disk is full")

        store.write = refused  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="corral.cluster"):
            await membership.leave()  # returns: the shutdown goes on

        assert node._thread is not None and not node._thread.is_alive() and not node.fenced
        assert any("could not release its sessions" in r.getMessage() for r in caplog.records)
        db = await asyncpg.connect(asyncpg_dsn(url))
        try:
            assert await db.fetchval("SELECT state FROM nodes WHERE id = $1", node.id) == "live"
        finally:
            await db.close()
