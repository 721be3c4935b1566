"""A run's stream reads its run's events by the run's index, not by walking its session's history."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.store import NewEvent, repo
from corral.types import EventType
from tests.store.test_store import LIMIT, running_store


def _read_and_explain(conn: Connection, *args: Any, **kwargs: Any) -> tuple[list[Any], str]:
    """``repo.events_after``'s result, and the plan of the statement it sent to the database."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        sent.append((statement, parameters))

    sa.event.listen(conn, "before_cursor_execute", capture)
    try:
        events = repo.events_after(conn, *args, **kwargs)
    finally:
        sa.event.remove(conn, "before_cursor_execute", capture)
    statement, parameters = sent[-1]
    prefix = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    rows = conn.exec_driver_sql(prefix + statement, parameters).all()
    return events, " ".join(str(part) for row in rows for part in row)


async def test_a_runs_events_are_read_by_the_runs_index(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        # A long history: 300 runs of 10 events in one session, and the run to read at its end.
        for batch in range(30):
            await store.write(None, [NewEvent("ses_long", EventType.MESSAGE_DELTA, f"run_{batch}_{n // 10}", {"n": n})
                                     for n in range(100)])
        await store.write(None, [NewEvent("ses_long", EventType.MESSAGE_DELTA, "run_last", {"n": n}) for n in range(5)])

        def analyze(conn: Connection) -> None:
            conn.exec_driver_sql("ANALYZE")

        await store.raw_write(analyze)
        events, plan = await store.read(_read_and_explain, "ses_long", 0, run_id="run_last", limit=200)
        assert "ix_events_run_id_seq" in plan, plan
        assert [e.seq for e in events] == list(range(3001, 3006))
        assert await store.read(repo.events_after, "ses_long", 3003, run_id="run_last", limit=1) == events[3:4]
        assert await store.read(repo.events_after, "ses_other", 0, run_id="run_last") == []
