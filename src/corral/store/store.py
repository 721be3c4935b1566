"""The store: one interface over SQLite and Postgres.

Store code is synchronous SQLAlchemy over a ``Connection`` (``repo``, ``ops``), and the
caller owns the transaction. Writes go through the single :class:`Writer` (group
commits, FIFO); a read is one function of a connection, run in one hand-off on the
reader lane, which WAL lets run beside the writer (see ``engine`` for why one hand-off
matters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import resources
from typing import Any, Concatenate, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from corral.store.engine import Dialect, Lane, dialect_for
from corral.store.events import Event, NewEvent
from corral.store.writer import CommitHook, Unit, Writer

P = ParamSpec("P")
T = TypeVar("T")


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("corral.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


class Store:
    """Owns the lanes and the writer. Start it with ``run_writer`` inside a task group."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL"):
        self.dialect: Dialect = dialect_for(url, sqlite_synchronous=sqlite_synchronous)
        self._write_lane: Lane = self.dialect.writer_lane()
        self._read_lane: Lane = self.dialect.reader_lane()
        self._listeners: list[CommitHook] = []
        self.writer = Writer(self._write_lane, self._dispatch)

    def __repr__(self) -> str:
        return f"<Store {self.dialect.name} {self.writer!r} reads={self._read_lane.hand_offs}>"

    def statistics(self) -> dict[str, int]:
        """Group commits, the units they carried, and the hand-offs writes and reads cost."""
        return {"batches": self.writer.batches, "units": self.writer.units,
                "write_hand_offs": self._write_lane.hand_offs, "read_hand_offs": self._read_lane.hand_offs}

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

        def upgrade(conn: Connection) -> None:
            with self.dialect.migrating(conn):
                command.upgrade(_alembic_config(conn), "head")
                conn.commit()

        await self._write_lane.run(upgrade)

    async def run_writer(self, started: asyncio.Event | None = None) -> None:
        await self.writer.run(started)

    def submit(self, unit: Unit, events: list[NewEvent] | None = None) -> asyncio.Future[Any]:
        return self.writer.submit(unit, events)

    async def write(self, unit: Unit, events: list[NewEvent] | None = None) -> Any:
        return await self.writer.write(unit, events)

    async def read(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(conn, *args, **kwargs)`` on a reader connection, in one hand-off.

        Put every statement a caller needs into ``fn`` (a ``repo`` function, or a small
        function of the caller's): each ``read`` is a trip to another thread and back.
        """
        return await self._read_lane.run(lambda conn: fn(conn, *args, **kwargs))

    async def raw_write(self, fn: Callable[[Connection], T]) -> T:
        """``fn`` in a committed transaction outside the writer, for tests that bypass the kernel on purpose."""

        def in_transaction(conn: Connection) -> T:
            with conn.begin():
                return fn(conn)

        return await self._read_lane.run(in_transaction)

    async def aclose(self) -> None:
        await self._write_lane.aclose()
        await self._read_lane.aclose()
