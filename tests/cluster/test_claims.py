"""Session claims serialise: however many nodes claim a free session at once, one takes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from corral.clock import utcnow
from corral.store import Store, nodes
from corral.store import tables as t
from tests.cluster.harness import asyncpg_dsn, fresh_database

LEASE_S = 10.0


@asynccontextmanager
async def stores(url: str, count: int) -> AsyncIterator[list[Store]]:
    """``count`` stores on one database, each with its own running writer: as many nodes."""
    opened = [Store(url) for _ in range(count)]
    async with asyncio.TaskGroup() as group:
        try:
            for store in opened:
                await store.migrate()
                started = asyncio.Event()
                group.create_task(store.run_writer(started))
                await started.wait()
            yield opened
        finally:
            for store in opened:
                store.writer.close()
    for store in opened:
        await store.aclose()


async def test_claims_that_wait_for_each_other_take_the_session_once() -> None:
    async with asyncio.timeout(30), fresh_database() as url, stores(url, 3) as (a, b, c):
        for index, store in enumerate((a, b, c)):
            await store.write(lambda conn, i=index: nodes.join(conn, f"node_{i}", f"http://127.0.0.1:{9000 + i}"))
        row = {"id": "ses_x", "agent": "assistant", "owner": "local", "key": None, "metadata": {},
               "created_at": utcnow(), "title": None, "summary": None}
        await a.raw_write(lambda conn: conn.execute(t.sessions.insert(), [row]))
        # Hold the session's row, so that all three claims queue on its lock; each then gets it
        # in turn, after the one before it committed.
        gate = await asyncpg.connect(asyncpg_dsn(url))
        held = gate.transaction()
        await held.start()
        await gate.execute("SELECT 1 FROM sessions WHERE id = 'ses_x' FOR UPDATE")
        claims = [asyncio.ensure_future(store.claim_session("ses_x", f"node_{i}", LEASE_S))
                  for i, store in enumerate((a, b, c))]

        async def all_waiting() -> None:
            while await gate.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "  # noqa: ASYNC110
                                      "AND wait_event_type = 'Lock'") < 3:
                await asyncio.sleep(0.02)

        await all_waiting()
        await held.rollback()
        await gate.close()
        kinds = sorted(claim.kind for claim in await asyncio.gather(*claims))
        assert kinds == ["adopted", "elsewhere", "elsewhere"]
