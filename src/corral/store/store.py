"""The store: one interface over SQLite and Postgres.

Writes go through the single :class:`Writer` (group commits, FIFO); reads use their
own pooled connections, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from corral.store.engine import Dialect, dialect_for
from corral.store.events import Event, NewEvent
from corral.store.writer import CommitHook, Unit, Writer


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("corral.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


class Store:
    """Owns the engines and the writer. Start it with ``run_writer`` inside a task group."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL"):
        self.dialect: Dialect = dialect_for(url, sqlite_synchronous=sqlite_synchronous)
        self._write_engine: AsyncEngine = self.dialect.writer_engine()
        self._read_engine: AsyncEngine = self.dialect.reader_engine()
        self._listeners: list[CommitHook] = []
        self.writer = Writer(self._write_engine, self._dispatch)

    def __repr__(self) -> str:
        return f"<Store {self.dialect.name} {self.writer!r}>"

    def on_commit(self, hook: CommitHook) -> None:
        """Call ``hook`` with every batch of events, after they are committed."""
        self._listeners.append(hook)

    def on_batch(self, hook: Callable[[int, float], None]) -> None:
        """Call ``hook(units, seconds)`` after each committed group commit (for metrics)."""
        self.writer.batch_hook = hook

    def _dispatch(self, events: list[Event]) -> None:
        for hook in self._listeners:
            hook(events)

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""

        def upgrade(connection: Connection) -> None:
            command.upgrade(_alembic_config(connection), "head")

        async with self._write_engine.connect() as conn, self.dialect.migrating(conn):
            await conn.run_sync(upgrade)
            await conn.commit()

    async def run_writer(self, started: asyncio.Event | None = None) -> None:
        await self.writer.run(started)

    def submit(self, unit: Unit, events: list[NewEvent] | None = None) -> asyncio.Future[Any]:
        return self.writer.submit(unit, events)

    async def write(self, unit: Unit, events: list[NewEvent] | None = None) -> Any:
        return await self.writer.write(unit, events)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._read_engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def raw_write_connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection outside the writer, for tests that bypass the kernel on purpose."""
        async with self._read_engine.begin() as conn:
            yield conn

    async def aclose(self) -> None:
        await self._write_engine.dispose()
        await self._read_engine.dispose()
