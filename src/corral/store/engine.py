"""Engines for the two supported databases, and the one place their differences live.

All store code is synchronous SQLAlchemy Core over a ``Connection``; a :class:`Lane`
is how the event loop gets such a function run, and that is what differs:

- SQLite: on threads that own plain ``sqlite3`` connections, so one hand-off runs a
  whole read or a whole group commit. Through aiosqlite each statement cost four or
  five hand-offs (cursor, execute, fetch, close, and the pool's reset), each waiting
  for a turn of a busy event loop; at 200 sessions that, not SQLite, bounded the
  throughput (docs/benchmarks.md).
- Postgres: on asyncpg connections, with the same synchronous code run through
  ``AsyncConnection.run_sync`` (SQLAlchemy's greenlet bridge); there every statement
  is a network round trip anyway, and the event loop stays free while it travels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from corral.errors import InvalidInput
from corral.store import codec

# JSON columns are written and read through corral/store/codec.py on every engine.
JSON_CODEC: dict[str, Any] = {"json_serializer": codec.dumps, "json_deserializer": codec.loads}

T = TypeVar("T")


class Lane(Protocol):
    """Runs synchronous functions of a connection for the event loop.

    ``run(fn)`` checks out a connection, calls ``fn(conn)`` and returns its result; the
    connection's transaction is the function's to open and commit (``conn.begin()``);
    whatever it leaves open is rolled back when the connection goes back to the pool.
    """

    hand_offs: int

    async def run(self, fn: Callable[[Connection], T]) -> T: ...

    async def aclose(self) -> None: ...


class ThreadLane:
    """Runs each function, in one hand-off, on one of ``threads`` threads of its own.

    With one thread, functions run one at a time in submission order on one
    connection: the single writer. Cancelling ``run`` does not stop a function that
    has begun; callers that must know its outcome shield the call.
    """

    def __init__(self, engine: sa.Engine, threads: int, name: str):
        self._engine = engine
        self._name = name
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.hand_offs = 0

    def __repr__(self) -> str:
        return f"<ThreadLane {self._name} hand_offs={self.hand_offs}>"

    async def run(self, fn: Callable[[Connection], T]) -> T:
        self.hand_offs += 1
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._call, fn)

    def _call(self, fn: Callable[[Connection], T]) -> T:
        with self._engine.connect() as conn:
            return fn(conn)

    async def aclose(self) -> None:
        # Waiting for a function still running would block the loop; a default-executor thread waits instead.
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        self._engine.dispose()


class GreenletLane:
    """Runs each function on a pooled async connection through ``run_sync``."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self.hand_offs = 0

    def __repr__(self) -> str:
        return f"<GreenletLane {self._engine.url.render_as_string()} hand_offs={self.hand_offs}>"

    async def run(self, fn: Callable[[Connection], T]) -> T:
        self.hand_offs += 1
        async with self._engine.connect() as conn:
            return await conn.run_sync(fn)

    async def aclose(self) -> None:
        await self._engine.dispose()


class Dialect:
    """What differs between backends. Add a method here, never an ``if dialect ==``."""

    name = "generic"

    def __init__(self, url: str):
        self.url = url

    def writer_lane(self) -> Lane:
        """The single writer's lane: one connection, functions run in order."""
        return GreenletLane(create_async_engine(self.url, pool_size=1, max_overflow=0, **JSON_CODEC))

    def reader_lane(self) -> Lane:
        return GreenletLane(create_async_engine(self.url, pool_size=8, max_overflow=8, **JSON_CODEC))

    @contextmanager
    def migrating(self, conn: Connection) -> Iterator[None]:
        """Whatever the backend needs around a schema migration on ``conn``."""
        yield


class SQLiteDialect(Dialect):
    """One file, WAL mode: readers never block the single writer."""

    name = "sqlite"
    READER_THREADS = 2

    def __init__(self, url: str, synchronous: str = "FULL"):
        super().__init__(url)
        self.synchronous = synchronous

    def _engine(self, begin: str, **kwargs: Any) -> sa.Engine:
        # Whatever driver the URL names, the store drives sqlite3 itself, on its threads.
        url = make_url(self.url).set(drivername="sqlite+pysqlite")
        # A pooled connection moves between the lane's threads, but only one uses it at a time.
        engine = sa.create_engine(url, connect_args={"check_same_thread": False}, **JSON_CODEC, **kwargs)
        synchronous = self.synchronous

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # sqlite3's own transaction handling off: SQLAlchemy's begin says BEGIN itself (below),
            # so a read sees one snapshot and a write takes the write lock at its start.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Straight to sqlite3: as a SQLAlchemy statement, BEGIN was a quarter of a small read.
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(begin)

        return engine

    def writer_lane(self) -> Lane:
        engine = self._engine("BEGIN IMMEDIATE", pool_size=1, max_overflow=0)
        # An ``executemany`` INSERT goes as pages of multi-row ``VALUES`` statements, not one
        # statement step per row: sqlite3 lets go of the GIL around every step and must take it
        # back after, which the busy event loop on the other thread makes slow, so a group
        # commit's wall time grew with its rows (docs/benchmarks.md).
        engine.dialect.use_insertmanyvalues_wo_returning = True
        return ThreadLane(engine, 1, "corral-writer")

    def reader_lane(self) -> Lane:
        threads = self.READER_THREADS
        return ThreadLane(self._engine("BEGIN", pool_size=threads, max_overflow=0), threads, "corral-reader")

    @contextmanager
    def migrating(self, conn: Connection) -> Iterator[None]:
        """SQLite alters a table by rebuilding it, and dropping a table that others refer to
        is refused while foreign keys are enforced; the switch only works outside a
        transaction, so it goes straight to the driver. Every reference is checked again
        before enforcement resumes."""
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("PRAGMA foreign_keys=OFF")
        try:
            yield
        finally:
            broken = driver.execute("PRAGMA foreign_key_check").fetchall()
            driver.execute("PRAGMA foreign_keys=ON")
        if broken:
            raise RuntimeError(f"the migration left {len(broken)} broken foreign key references: {broken[:5]}")


class PostgresDialect(Dialect):
    name = "postgresql"
    # Any fixed number: the advisory lock that nodes starting at once take around migrating.
    MIGRATION_LOCK = 727_001

    @contextmanager
    def migrating(self, conn: Connection) -> Iterator[None]:
        """Nodes of a cluster may start together on a new database: one migrates, the others
        wait for it and then find the schema at its head."""
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({self.MIGRATION_LOCK})")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self.MIGRATION_LOCK})")
            conn.commit()


SQLITE_DRIVERS = frozenset({"pysqlite", "aiosqlite"})


def dialect_for(url: str, *, sqlite_synchronous: str = "FULL") -> Dialect:
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except Exception as exc:  # sqlalchemy raises ArgumentError with no stable subclass
        raise InvalidInput(f"not a database URL: {url!r}") from exc
    if backend == "sqlite":
        # `sqlite:///path`; the driver names of earlier versions (aiosqlite, pysqlite) are accepted too.
        if parsed.get_driver_name() not in SQLITE_DRIVERS:
            raise InvalidInput("write SQLite URLs as sqlite:///path")
        # ``file:name?mode=memory&uri=true`` is in-memory too (each connection its own database).
        in_memory = "memory" in str(parsed.query.get("mode", ""))
        if in_memory or not parsed.database or ":memory:" in parsed.database:
            raise InvalidInput("an in-memory SQLite database cannot be shared by the writer and readers")
        return SQLiteDialect(url, synchronous=sqlite_synchronous.upper())
    if backend == "postgresql":
        if not url.startswith("postgresql+asyncpg"):
            raise InvalidInput("use the async Postgres driver: postgresql+asyncpg://...")
        return PostgresDialect(url)
    raise InvalidInput(f"unsupported database backend {backend!r}; use SQLite or Postgres")
