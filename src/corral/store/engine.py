"""Engines for the two supported databases, and the one place their differences live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from corral.errors import InvalidInput


class Dialect:
    """What differs between backends. Add a method here, never an ``if dialect ==``."""

    name = "generic"

    def __init__(self, url: str):
        self.url = url

    def writer_engine(self) -> AsyncEngine:
        return create_async_engine(self.url, pool_size=1, max_overflow=0)

    def reader_engine(self) -> AsyncEngine:
        return create_async_engine(self.url, pool_size=8, max_overflow=8)

    @asynccontextmanager
    async def migrating(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """Whatever the backend needs around a schema migration on ``conn``."""
        yield


class SQLiteDialect(Dialect):
    """One file, WAL mode: readers never block the single writer."""

    name = "sqlite"

    def __init__(self, url: str, synchronous: str = "FULL"):
        super().__init__(url)
        self.synchronous = synchronous

    def _engine(self, **kwargs: Any) -> AsyncEngine:
        engine = create_async_engine(self.url, **kwargs)
        synchronous = self.synchronous

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine

    def writer_engine(self) -> AsyncEngine:
        return self._engine(pool_size=1, max_overflow=0)

    def reader_engine(self) -> AsyncEngine:
        return self._engine(pool_size=4, max_overflow=4)

    @asynccontextmanager
    async def migrating(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """SQLite alters a table by rebuilding it, and dropping a table that others refer to
        is refused while foreign keys are enforced; the switch only works outside a
        transaction. Every reference is checked again before enforcement resumes."""
        await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        await conn.commit()
        try:
            yield
        finally:
            broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            await conn.commit()
        if broken:
            raise RuntimeError(f"the migration left {len(broken)} broken foreign key references: {broken[:5]}")


class PostgresDialect(Dialect):
    name = "postgresql"


def dialect_for(url: str, *, sqlite_synchronous: str = "FULL") -> Dialect:
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except Exception as exc:  # sqlalchemy raises ArgumentError with no stable subclass
        raise InvalidInput(f"not a database URL: {url!r}") from exc
    if backend == "sqlite":
        if not url.startswith("sqlite+aiosqlite"):
            raise InvalidInput("use the async SQLite driver: sqlite+aiosqlite:///path")
        # ``file:name?mode=memory&uri=true`` is in-memory too (each connection its own database).
        in_memory = "memory" in str(parsed.query.get("mode", ""))
        if in_memory or ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:"):
            raise InvalidInput("an in-memory SQLite database cannot be shared by the writer and readers")
        return SQLiteDialect(url, synchronous=sqlite_synchronous.upper())
    if backend == "postgresql":
        if not url.startswith("postgresql+asyncpg"):
            raise InvalidInput("use the async Postgres driver: postgresql+asyncpg://...")
        return PostgresDialect(url)
    raise InvalidInput(f"unsupported database backend {backend!r}; use SQLite or Postgres")
