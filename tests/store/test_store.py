"""The store on both backends: schema, the single writer's contract, the database invariants.

Every test that touches a database runs on a SQLite file and on a fresh Postgres
database (the ``db_url`` fixture), so the store code is proven shared.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError, StatementError

from corral.errors import InvalidInput, ShuttingDown
from corral.store import Event, NewEvent, Store, ops, repo
from corral.store import tables as t
from corral.store.engine import PostgresDialect, SQLiteDialect, dialect_for
from corral.store.migrations import head_revision
from corral.store.store import _alembic_config
from corral.types import EventType, RunStatus
from tests.helpers import stored_events

LIMIT = 20.0


@asynccontextmanager
async def running_store(url: str) -> AsyncIterator[Store]:
    """A migrated store with its writer running; always closed and disposed afterwards."""
    store = Store(url)
    try:
        await store.migrate()
        started = asyncio.Event()
        task = asyncio.create_task(store.run_writer(started))
        try:
            waiter = asyncio.create_task(started.wait())
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not started.is_set():
                waiter.cancel()
                await task  # raises the writer's start-up error
            yield store
        finally:
            store.writer.close()
            await task
    finally:
        await store.aclose()


def ev(session_id: str, n: int = 0, run_id: str | None = None) -> NewEvent:
    return NewEvent(session_id, EventType.MESSAGE_DELTA, run_id, {"n": n})


def insert_agent(name: str, calls: list[str] | None = None) -> Any:
    """A unit that inserts one agent row (the primary key is the name)."""

    def unit(conn: sa.Connection) -> str:
        if calls is not None:
            calls.append(name)
        repo.insert_agent(conn, name, {}, datetime.now(UTC))
        return name

    return unit


async def agent_names(store: Store) -> list[str]:
    return sorted(row.name for row in await store.read(repo.all_agents, ))


def session_row(session_id: str) -> dict[str, Any]:
    return {"id": session_id, "agent": "assistant", "owner": "local", "key": None, "metadata": {},
            "created_at": datetime.now(UTC)}


def run_row(run_id: str, session_id: str, status: str, position: float = 1.0,
            created_at: datetime | None = None) -> dict[str, Any]:
    return {"id": run_id, "session_id": session_id, "status": status, "position": position, "policy": "continue",
            "collect": False, "created_at": created_at or datetime.now(UTC)}


# --- schema -----------------------------------------------------------------------------


def _schema_diff(conn: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, t.metadata))


def _version(conn: sa.Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all())


async def test_migrations_produce_exactly_the_metadata(db_url: str) -> None:
    async with asyncio.timeout(LIMIT):
        store = Store(db_url)
        try:
            await store.migrate()
            assert await store.read(_schema_diff) == []
            version = await store.read(_version)
            names = set(await store.read(lambda c: sa.inspect(c).get_table_names()))
            assert version == [head_revision()]  # the newest migration file, whichever that is
            assert names == set(t.metadata.tables) | {"alembic_version"}
        finally:
            await store.aclose()


async def test_upgrade_from_0001_gives_old_sessions_to_local_and_scopes_keys(db_url: str) -> None:
    """A database made before principals keeps its sessions, runs and references; keys become per owner."""
    async with asyncio.timeout(LIMIT):
        store = Store(db_url)
        try:
            def old_database(conn: sa.Connection) -> None:
                command.upgrade(_alembic_config(conn), "0001")
                conn.execute(sa.text(
                    "INSERT INTO sessions (id, agent, key, metadata, created_at) "
                    "VALUES ('ses_old', 'assistant', 'main', '{}', :now)"), {"now": datetime.now(UTC)})
                conn.execute(t.runs.insert(), [run_row("run_old", "ses_old", "completed")])

            await store.raw_write(old_database)
            await store.migrate()
            assert await store.read(_schema_diff) == []
            old = await store.read(repo.get_session, "ses_old")
            assert old is not None and old.owner == "local" and old.key == "main"
            assert await store.read(repo.get_run, "run_old") is not None
            # The same key, another owner: allowed.
            await store.raw_write(lambda conn: conn.execute(
                t.sessions.insert(), [{**session_row("ses_new"), "owner": "alice", "key": "main"}]))
            with pytest.raises(IntegrityError):  # the same key, the same owner: refused
                await store.raw_write(lambda conn: conn.execute(
                    t.sessions.insert(), [{**session_row("ses_dup"), "key": "main"}]))
            with pytest.raises(IntegrityError):  # foreign keys still enforced after the rebuild
                await store.raw_write(lambda conn: conn.execute(
                    t.runs.insert(), [run_row("run_orphan", "ses_missing", "queued")]))
        finally:
            await store.aclose()


async def test_the_active_run_index_is_partial_and_unique(db_url: str) -> None:
    """compare_metadata does not look at an index's WHERE clause; check it was created."""
    async with asyncio.timeout(LIMIT):
        store = Store(db_url)
        try:
            await store.migrate()
            indexes = await store.read(lambda c: sa.inspect(c).get_indexes("runs"))
            (index,) = [i for i in indexes if i["name"] == "uq_runs_one_active_per_session"]
            assert index["unique"]
            assert index["column_names"] == ["session_id"]
            where = index.get("dialect_options", {}).get(f"{store.dialect.name}_where")
            if where is not None:  # reflected by the Postgres dialect; behaviour is tested below
                assert "running" in str(where) and "waiting" in str(where)
        finally:
            await store.aclose()


async def test_migrate_is_idempotent_and_keeps_data(db_url: str) -> None:
    async with asyncio.timeout(LIMIT):
        async with running_store(db_url) as store:
            await store.write(insert_agent("kept"))
            await store.write(None, [ev("ses_a"), ev("ses_a")])
        store = Store(db_url)
        try:
            await store.migrate()
            await store.migrate()
            assert await store.read(_schema_diff) == []
            assert await store.read(_version) == [head_revision()]
            assert await agent_names(store) == ["kept"]
            assert [e.seq for e in await stored_events(store, "ses_a")] == [1, 2]
        finally:
            await store.aclose()


# --- the writer ---------------------------------------------------------------------------


async def test_units_commit_in_submission_order(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        calls: list[str] = []
        names = [f"agent-{i:03d}" for i in range(50)]
        futures = [store.submit(insert_agent(name, calls), [ev("ses_fifo", i)]) for i, name in enumerate(names)]
        done_order: list[str] = []
        for future in futures:
            future.add_done_callback(lambda f: done_order.append(f.result()))
        assert await asyncio.gather(*futures) == names
        assert calls == names  # functions ran in submission order
        assert done_order == names  # and futures resolved in that order
        events = await stored_events(store, "ses_fifo")
        assert [e.data["n"] for e in events] == list(range(50))  # seq order is submission order
        assert [e.seq for e in events] == list(range(1, 51))
        assert await agent_names(store) == names


async def test_units_submitted_together_are_group_committed(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        await store.write(None, [ev("ses_warm")])
        batches, units = store.writer.batches, store.writer.units
        n = 200
        futures = [store.submit(insert_agent(f"g{i}"), [ev("ses_group", i)]) for i in range(n)]
        await asyncio.gather(*futures)
        assert store.writer.units - units == n
        used = store.writer.batches - batches
        assert 1 <= used < n // 10, f"{n} units took {used} commits"
        assert len(await agent_names(store)) == n
        assert [e.seq for e in await stored_events(store, "ses_group")] == list(range(1, n + 1))


async def test_a_batch_is_one_hand_off_and_a_read_is_one_hand_off(db_url: str) -> None:
    """However many units and statements, a group commit costs at most one trip to the writer's
    lane, and a read function of several statements one trip to a reader."""
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        await store.write([ops.Insert(t.sessions, [session_row("ses_hop")])])
        before = store.statistics()
        futures = [store.submit([ops.Insert(t.runs, [run_row(f"run_{i}", "ses_hop", "completed", float(i))])],
                                [ev("ses_hop", i)]) for i in range(100)]
        await asyncio.gather(*futures)
        after = store.statistics()
        assert after["units"] - before["units"] == 100
        # One hand-off drains whatever is pending, batch after batch (the one that committed the
        # session may still be draining and take these too): never more hand-offs than batches.
        assert 1 <= after["batches"] - before["batches"] < 10
        assert after["write_hand_offs"] - before["write_hand_offs"] <= after["batches"] - before["batches"]
        compaction, rows = await store.read(repo.conversation, "ses_hop")  # two statements
        assert compaction is None and rows == []
        assert store.statistics()["read_hand_offs"] - after["read_hand_offs"] == 1


async def test_units_run_on_one_thread_outside_the_event_loop_on_sqlite(tmp_path: Any) -> None:
    """SQLite's single writer is a thread of its own: a slow fsync never stalls the event loop."""
    async with asyncio.timeout(LIMIT), running_store(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}") as store:
        threads: list[str] = []

        def unit(conn: sa.Connection) -> None:
            threads.append(threading.current_thread().name)

        for _ in range(3):  # three batches
            await asyncio.gather(*(store.submit(unit) for _ in range(5)))
        assert len(threads) == 15 and len(set(threads)) == 1
        assert threads[0] != threading.current_thread().name and threads[0].startswith("corral-writer")


async def test_a_cancelled_writer_reports_the_real_outcome_of_its_last_batch(tmp_path: Any) -> None:
    """A batch already handed to the writer's thread commits even if the writer task is cancelled;
    its units are told it committed (a 202 means committed, never "failed" for a commit that happened)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    store = Store(url)
    entered, gate = threading.Event(), threading.Event()
    try:
        async with asyncio.timeout(LIMIT):
            await store.migrate()
            started = asyncio.Event()
            task = asyncio.create_task(store.run_writer(started))
            await started.wait()

            def held(conn: sa.Connection) -> str:
                entered.set()
                assert gate.wait(LIMIT), "the test never opened the gate"
                repo.insert_agent(conn, "held", {}, datetime.now(UTC))
                return "held"

            future = store.submit(held, [ev("ses_cancel")])
            assert await asyncio.to_thread(entered.wait, LIMIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not future.done()  # still committing on the writer's thread
            gate.set()
            assert await future == "held"
            assert await agent_names(store) == ["held"]
            assert [e.seq for e in await stored_events(store, "ses_cancel")] == [1]
    finally:
        gate.set()
        await store.aclose()


async def test_close_drains_queued_units_then_refuses_new_ones(db_url: str) -> None:
    async with asyncio.timeout(LIMIT):
        store = Store(db_url)
        try:
            await store.migrate()
            started = asyncio.Event()
            task = asyncio.create_task(store.run_writer(started))
            await started.wait()
            futures = [store.submit(None, [ev("ses_close", i)]) for i in range(20)]
            store.writer.close()
            with pytest.raises(ShuttingDown):
                store.submit(None, [ev("ses_close", 99)])
            await task
            assert all(f.done() and f.exception() is None for f in futures)
            assert [e.data["n"] for e in await stored_events(store, "ses_close")] == list(range(20))
        finally:
            await store.aclose()


async def test_event_seq_is_gap_free_per_session_from_one(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        published: list[Event] = []
        store.on_commit(published.extend)
        futures = []
        for i in range(30):
            # Interleave three sessions, sometimes several events in one unit.
            futures.append(store.submit(None, [ev("ses_a", i)]))
            futures.append(store.submit(None, [ev("ses_b", i), ev("ses_b", i), ev("ses_c", i)]))
            if i % 7 == 0:
                await asyncio.gather(*futures)  # spread over several batches too
        await asyncio.gather(*futures)
        expected = {"ses_a": 30, "ses_b": 60, "ses_c": 30}
        for session_id, count in expected.items():
            events = await stored_events(store, session_id)
            assert [e.seq for e in events] == list(range(1, count + 1))
            assert [e for e in published if e.session_id == session_id] == events
        for event in published:
            assert event.ts.utcoffset() == timedelta(0)


async def test_event_seq_continues_after_a_store_restart(db_url: str) -> None:
    async with asyncio.timeout(LIMIT):
        async with running_store(db_url) as store:
            await store.write(None, [ev("ses_a", i) for i in range(5)])
            await store.write(None, [ev("ses_b", i) for i in range(2)])
        async with running_store(db_url) as store:  # a new process on the same database
            futures = [store.submit(None, [ev("ses_a", 5 + i), ev("ses_new", i)]) for i in range(5)]
            await asyncio.gather(*futures)
            await store.write(None, [ev("ses_b", 2)])
            a = await stored_events(store, "ses_a")
            assert [e.seq for e in a] == list(range(1, 11))
            assert [e.data["n"] for e in a] == list(range(10))
            assert [e.seq for e in await stored_events(store, "ses_b")] == [1, 2, 3]
            assert [e.seq for e in await stored_events(store, "ses_new")] == [1, 2, 3, 4, 5]


async def test_a_failing_unit_fails_alone_and_leaves_no_gap(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        published: list[Event] = []
        store.on_commit(published.extend)
        await store.write(insert_agent("taken"), [ev("ses_f", 0)])
        # One batch: good, duplicate of an earlier row, good, duplicate within the batch, good.
        futures = [
            store.submit(insert_agent("first"), [ev("ses_f", 1)]),
            store.submit(insert_agent("taken"), [ev("ses_f", 2), ev("ses_f", 2)]),
            store.submit(insert_agent("second"), [ev("ses_f", 3)]),
            store.submit(insert_agent("second"), [ev("ses_f", 4)]),
            store.submit(insert_agent("third"), [ev("ses_f", 5)]),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] == "first"
        assert isinstance(results[1], IntegrityError)
        assert results[2] == "second"
        assert isinstance(results[3], IntegrityError)
        assert results[4] == "third"
        assert await agent_names(store) == ["first", "second", "taken", "third"]
        events = await stored_events(store, "ses_f")
        assert [(e.seq, e.data["n"]) for e in events] == [(1, 0), (2, 1), (3, 3), (4, 5)]
        assert published == events  # observers saw exactly what was committed
        await store.write(None, [ev("ses_f", 6)])  # and numbering goes on without a hole
        assert [e.seq for e in await stored_events(store, "ses_f")] == [1, 2, 3, 4, 5]


async def test_a_unit_and_its_events_are_atomic(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        await store.write(insert_agent("taken"))

        def half_then_duplicate(conn: sa.Connection) -> None:
            repo.insert_agent(conn, "half", {}, datetime.now(UTC))
            repo.insert_agent(conn, "taken", {}, datetime.now(UTC))

        def half_then_bug(conn: sa.Connection) -> None:
            repo.insert_agent(conn, "half2", {}, datetime.now(UTC))
            raise ValueError("a bug in the unit")

        with pytest.raises(IntegrityError):
            await store.write(half_then_duplicate, [ev("ses_x", 1)])
        with pytest.raises(ValueError, match="a bug in the unit"):
            await store.write(half_then_bug, [ev("ses_x", 2)])
        assert await agent_names(store) == ["taken"]
        assert await stored_events(store, "ses_x") == []
        # An event row that cannot be stored fails its unit's function as well.
        too_long = NewEvent("ses_x", EventType.MESSAGE_DELTA, "r" * 100, {})  # run_id is VARCHAR(40)
        if store.dialect.name == "postgresql":  # SQLite does not enforce VARCHAR lengths
            with pytest.raises(sa.exc.DBAPIError):
                await store.write(insert_agent("with-bad-event"), [too_long])
            assert await agent_names(store) == ["taken"]
        await store.write(None, [ev("ses_x", 3)])
        assert [(e.seq, e.data["n"]) for e in await stored_events(store, "ses_x")] == [(1, 3)]


def _count_from_another_connection(url: str, session_id: str) -> int:
    """Count committed events through a brand-new engine on another thread and loop.

    The writer's commit hook is synchronous, so it cannot await a read itself; a
    separate thread with its own connection can only see what is committed.
    """
    result: list[int] = []
    errors: list[BaseException] = []

    async def count() -> int:
        other = Store(url)
        try:
            query = sa.select(sa.func.count()).select_from(t.events).where(t.events.c.session_id == session_id)
            return int(await other.read(lambda conn: conn.execute(query).scalar_one()))
        finally:
            await other.aclose()

    def target() -> None:
        try:
            result.append(asyncio.run(count()))
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=10)
    if errors:
        raise errors[0]
    assert result, "the reading thread did not finish"
    return result[0]


async def test_on_commit_hooks_see_events_only_after_commit(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        seen: list[tuple[list[int], int]] = []
        failures: list[BaseException] = []

        def hook(events: list[Event]) -> None:
            mine = [e.seq for e in events if e.session_id == "ses_hook"]
            if not mine:
                return
            try:
                seen.append((mine, _count_from_another_connection(db_url, "ses_hook")))
            except BaseException as exc:  # never break the writer; report below
                failures.append(exc)

        store.on_commit(hook)
        await store.write(None, [ev("ses_hook", 0)])
        await asyncio.gather(*(store.submit(None, [ev("ses_hook", i)]) for i in range(1, 4)))
        assert not failures
        assert seen == [([1], 1), ([2, 3, 4], 4)]


# --- database invariants ------------------------------------------------------------------


async def test_one_running_or_waiting_run_per_session_is_a_database_fact(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        def setup(conn: sa.Connection) -> None:
            for sid in ("ses_1", "ses_2"):
                repo.insert_session(conn, session_row(sid))
            repo.insert_run(conn, run_row("run_active", "ses_1", "running"))
            # Any number of queued and ended runs beside it.
            for i, status in enumerate(["queued", "queued", "completed", "completed", "failed", "cancelled",
                                        "interrupted", "interrupted"]):
                repo.insert_run(conn, run_row(f"run_other_{i}", "ses_1", status, position=2.0 + i))
            # Another session has its own active run.
            repo.insert_run(conn, run_row("run_s2", "ses_2", "waiting"))

        def hand_over(conn: sa.Connection) -> None:
            repo.update_run(conn, "run_active", status="completed")
            repo.update_run(conn, "run_other_0", status="waiting")

        await store.raw_write(setup)
        for second in ("running", "waiting"):
            with pytest.raises(IntegrityError):
                await store.raw_write(lambda conn: repo.insert_run(
                    conn, run_row(f"run_second_{second}", "ses_1", second, position=20.0)))  # noqa: B023
            with pytest.raises(IntegrityError):  # promoting a queued run is refused the same way
                await store.raw_write(lambda conn: repo.update_run(conn, "run_other_0", status=second))  # noqa: B023
        # Once the active run ended, another may become active.
        await store.raw_write(hand_over)
        assert await store.read(repo.count_active_runs, "ses_1") == 1
        assert await store.read(repo.count_active_runs, "ses_2") == 1
        statuses = sorted(r.status for r in await store.read(
            repo.list_runs, session_ids=["ses_1"], statuses=None, limit=100, offset=0))
        assert statuses.count("waiting") == 1 and "running" not in statuses
        assert len(statuses) == 9


async def test_the_writer_path_hits_the_same_index(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        await store.write(lambda conn: repo.insert_session(conn, session_row("ses_w")))
        await store.write(lambda conn: repo.insert_run(conn, run_row("run_a", "ses_w", "running")))
        with pytest.raises(IntegrityError):
            await store.write(lambda conn: repo.insert_run(conn, run_row("run_b", "ses_w", "running", 2.0)),
                              [ev("ses_w")])
        assert await stored_events(store, "ses_w") == []


async def test_ending_one_run_and_starting_the_next_in_one_batch(db_url: str) -> None:
    """Group commit and the one-active-run index agree: a hand-over commits as one batch,
    and a start submitted before the end it depends on fails alone."""
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        now = datetime.now(UTC)
        await store.write([ops.Insert(t.sessions, [session_row("ses_h")]), ops.Insert(t.runs, [
            run_row("run_a", "ses_h", "running"), run_row("run_b", "ses_h", "queued", 2.0),
            run_row("run_c", "ses_h", "queued", 3.0)])])
        batches = store.writer.batches
        await asyncio.gather(
            store.submit([ops.UpdateRun("run_a", status="completed", ended_at=now)], [ev("ses_h", 1)]),
            store.submit([ops.UpdateRun("run_b", status="running", started_at=now)], [ev("ses_h", 2)]),
        )
        assert store.writer.batches - batches == 1
        early, end = await asyncio.gather(
            store.submit([ops.UpdateRun("run_c", status="running", started_at=now)], [ev("ses_h", 3)]),
            store.submit([ops.UpdateRun("run_b", status="completed", ended_at=now)], [ev("ses_h", 4)]),
            return_exceptions=True,
        )
        assert isinstance(early, IntegrityError) and end is None
        statuses = {r.id: r.status for r in await store.read(
            repo.list_runs, session_ids=["ses_h"], statuses=None, limit=10, offset=0)}
        assert statuses == {"run_a": "completed", "run_b": "completed", "run_c": "queued"}
        assert [(e.seq, e.data["n"]) for e in await stored_events(store, "ses_h")] == [(1, 1), (2, 2), (3, 4)]


# --- timestamps ---------------------------------------------------------------------------


async def test_timestamps_round_trip_as_utc_aware(db_url: str) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    # Earlier instant, but a later wall-clock reading than `later`: ordering must use UTC.
    earlier = datetime(2024, 3, 10, 12, 0, 0, 123456, tzinfo=india)
    later = datetime(2024, 3, 10, 7, 0, 0, 1, tzinfo=UTC)
    assert earlier < later
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:

        def unit(conn: sa.Connection) -> None:
            repo.insert_session(conn, {**session_row("ses_t"), "created_at": earlier})
            repo.insert_run(conn, run_row("run_early", "ses_t", "completed", created_at=earlier))
            repo.insert_run(conn, run_row("run_late", "ses_t", "queued", 2.0, created_at=later))
            repo.update_run(conn, "run_early", started_at=earlier, ended_at=later)

        await store.write(unit, [NewEvent("ses_t", EventType.RUN_QUEUED, "run_early", {}, ts=earlier)])
        early = await store.read(repo.get_run, "run_early")
        session = await store.read(repo.get_session, "ses_t")
        newest_first = await store.read(repo.list_runs, session_ids=["ses_t"], statuses=None, limit=10, offset=0)
        (event,) = await store.read(repo.events_after, "ses_t", 0)
        assert early is not None and session is not None
        for value, original in [(early.created_at, earlier), (early.started_at, earlier),
                                (early.ended_at, later), (session.created_at, earlier), (event.ts, earlier)]:
            assert isinstance(value, datetime)
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
            assert value == original  # same instant, microseconds included
        assert early.created_at.hour == 6 and early.created_at.minute == 30
        assert [r.id for r in newest_first] == ["run_late", "run_early"]


async def test_a_naive_timestamp_is_refused(db_url: str) -> None:
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:
        naive = datetime(2024, 1, 1, 12, 0, 0)
        with pytest.raises(StatementError, match="naive datetime"):
            await store.write(lambda conn: repo.insert_agent(conn, "naive", {}, naive))
        assert await agent_names(store) == []


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "",
    "not a url",
    "mysql+aiomysql://user@host/db",
    "postgres://user@host/db",
    "sqlite+pysqlcipher:///corral.db",
    "postgresql://user@host/db",
    "postgresql+psycopg2://user@host/db",
    "sqlite+aiosqlite://",
    "sqlite+aiosqlite:///",
    "sqlite+aiosqlite:///:memory:",
    "sqlite+aiosqlite:///file::memory:?cache=shared",
    "sqlite+aiosqlite:///file:corral?mode=memory&cache=shared&uri=true",
    "sqlite://",
    "sqlite:///:memory:",
])
def test_dialect_for_refuses_unusable_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        dialect_for(url)
    with pytest.raises(InvalidInput):
        Store(url)


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"])
def test_dialect_for_accepts_the_two_backends(tmp_path: Any, scheme: str) -> None:
    """`sqlite:///path`, and the driver names earlier versions asked for, so old configs still work."""
    sqlite = dialect_for(f"{scheme}:///{tmp_path / 'x.db'}", sqlite_synchronous="normal")
    assert isinstance(sqlite, SQLiteDialect) and sqlite.synchronous == "NORMAL"
    assert isinstance(dialect_for("postgresql+asyncpg://user@host:5432/db"), PostgresDialect)


def test_run_statuses_match_the_index_predicate() -> None:
    """The partial index names the active statuses literally; keep it in step with the enum."""
    active = sorted(s.value for s in RunStatus if s.is_active)
    assert active == ["running", "waiting"]
    (index,) = [i for i in t.runs.indexes if i.name == "uq_runs_one_active_per_session"]
    for dialect in ("sqlite", "postgresql"):
        where = str(index.dialect_options[dialect]["where"])
        assert all(f"'{status}'" in where for status in active)


async def test_none_in_a_json_column_is_sql_null_on_both_backends(db_url: str) -> None:
    """``WHERE error IS NULL`` must mean the same on SQLite and Postgres."""
    async with asyncio.timeout(LIMIT), running_store(db_url) as store:

        def unit(conn: sa.Connection) -> None:
            repo.insert_session(conn, session_row("ses_j"))
            repo.insert_run(conn, run_row("run_set", "ses_j", "completed"))
            repo.update_run(conn, "run_set", error=None, usage=None, output=None)
            repo.insert_run(conn, run_row("run_unset", "ses_j", "queued", 2.0))
            repo.insert_run(conn, run_row("run_failed", "ses_j", "failed", 3.0))
            repo.update_run(conn, "run_failed", error={"code": "x"})
            repo.insert_messages(conn, [{"session_id": "ses_j", "run_id": "run_set", "input_id": None,
                                         "role": "user", "content": "hi", "tool_calls": None,
                                         "tool_call_id": None, "rolled_back": False,
                                         "created_at": datetime.now(UTC)}])

        def check(conn: sa.Connection) -> tuple[Any, Any, Any, Any]:
            no_error = conn.execute(
                sa.select(t.runs.c.id).where(t.runs.c.error.is_(None)).order_by(t.runs.c.id)).scalars().all()
            no_usage = conn.execute(
                sa.select(sa.func.count()).select_from(t.runs).where(t.runs.c.usage.is_(None))).scalar_one()
            no_calls = conn.execute(
                sa.select(sa.func.count()).select_from(t.messages).where(t.messages.c.tool_calls.is_(None))
            ).scalar_one()
            return no_error, no_usage, no_calls, repo.get_run(conn, "run_failed")

        await store.write(unit)
        no_error, no_usage, no_calls, failed = await store.read(check)
        assert no_error == ["run_set", "run_unset"]
        assert no_usage == 3 and no_calls == 1
        assert failed is not None and failed.error == {"code": "x"}
