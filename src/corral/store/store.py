"""The store: one interface over SQLite and Postgres.

Store code is synchronous SQLAlchemy over a ``Connection`` (``repo``, ``ops``), and the
caller owns the transaction. Writes go through the single :class:`Writer` (group
commits, FIFO); a read is one function of a connection, run in one hand-off on the
reader lane, which WAL lets run beside the writer (see ``engine`` for why one hand-off
matters).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from corral.clock import utcnow
from corral.errors import CorralError, StoreConflict, StoreRejected, StoreUnavailable
from corral.events import Event, NewEvent
from corral.records import NewMessage, Writes
from corral.store import codec, nodes, ops, repo
from corral.store import tables as t
from corral.store.engine import Dialect, Lane, dialect_for
from corral.store.health import WriteHealth
from corral.store.migrations import SCRIPT_LOCATION, at_head
from corral.store.plan import message_row, ops_of
from corral.store.writer import CommitHook, Unit, Writer
from corral.text import clean

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config  # only when some migration is due: it takes a while to import

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
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
        # Whether the store takes writes, as the writer's last commit found (readiness reads it).
        self.health = WriteHealth()
        self.writer.outcome_hook = self._write_outcome

    def __repr__(self) -> str:
        return f"<Store {self.dialect.name} {self.writer!r} reads={self._read_lane.hand_offs}>"

    def statistics(self) -> dict[str, int]:
        """Group commits, the units they carried, and the hand-offs writes and reads cost."""
        return {"batches": self.writer.batches, "units": self.writer.units,
                "write_hand_offs": self._write_lane.hand_offs, "read_hand_offs": self._read_lane.hand_offs}

    def on_commit(self, hook: CommitHook) -> None:
        """Call ``hook`` with every batch of events, after they are committed."""
        self._listeners.append(hook)

    def on_messages(self, hook: Callable[[list[dict[str, Any]] | None], None]) -> None:
        """Call ``hook`` with the messages each batch inserted (rows with their ids, as reading
        them back would give them), after the commit and before the batch's writes resolve;
        with None if they could not be put in that form (whoever follows them reads again)."""

        def deliver(rows: list[dict[str, Any]]) -> None:
            try:
                stored: list[dict[str, Any]] | None = [_as_stored(row) for row in rows]
            except Exception:
                log.exception("could not put a commit's messages in their stored form")
                stored = None
            hook(stored)

        self.writer.messages_hook = deliver

    def on_batch(self, hook: Callable[[int, float], None]) -> None:
        """Call ``hook(units, seconds)`` after each committed group commit (for metrics)."""
        self.writer.batch_hook = hook

    def _dispatch(self, events: list[Event]) -> None:
        for hook in self._listeners:
            hook(events)

    def _write_outcome(self, error: Exception | None) -> None:
        if error is None:
            self.health.committed()
        elif _says_unwritable(error):
            # SQLite's extended code tells a full disk (SQLITE_FULL) from a file that may not
            # grow (SQLITE_IOERR_WRITE) where its message says only "disk I/O error".
            code = getattr(getattr(error, "orig", None), "sqlite_errorname", None)
            self.health.failed(_first_line(error) + (f" ({code})" if code else ""))

    async def probe(self) -> bool:
        """Whether the store takes a write now: a row added and removed in one transaction, so
        the database must really write (a commit with nothing in it writes nothing). Its outcome
        is recorded in ``health`` like any other write's."""
        try:
            await self.writer.submit(_probe, translate=store_error, gated=False)
        except CorralError:
            return False
        return True

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; alembic loads only if one is due)."""

        def upgrade(conn: Connection) -> None:
            with self.dialect.migrating(conn):
                if not at_head(conn):
                    from alembic import command

                    command.upgrade(_alembic_config(conn), "head")
                conn.commit()

        await self._write_lane.run(upgrade)

    async def run_writer(self, started: asyncio.Event | None = None) -> None:
        await self.writer.run(started)

    def submit(self, unit: Unit, events: list[NewEvent] | None = None) -> asyncio.Future[Any]:
        return self.writer.submit(unit, events)

    async def write(self, unit: Unit, events: list[NewEvent] | None = None, *, translate: bool = False) -> Any:
        """Write ``unit`` and wait for its commit. A failure is the driver's exception, or with
        ``translate`` the kernel's (``store_error``: a full disk is ``StoreUnavailable``, 503)."""
        return await self.writer.submit(unit, events, translate=store_error if translate else None)

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

    # --- what the kernel records: named operations over plain records ----------------------
    # Each returns the unit's future at once (FIFO with every other write); a failure is a
    # ``StoreConflict`` or ``StoreUnavailable``, never a driver's exception, so the kernel can
    # repair its transition without knowing SQL. Separate names for separate transitions, so
    # a caller (or a test store that fails on cue) can tell an acceptance from a run's end.

    def accept(self, writes: Writes) -> asyncio.Future[Any]:
        """An accepted input (with its new run, and the run's start when it begins at once)."""
        return self._submit(writes)

    def begin_run(self, writes: Writes) -> asyncio.Future[Any]:
        """A queued run's move to ``running``, its inputs consumed as user messages."""
        return self._submit(writes)

    def end_run(self, writes: Writes) -> asyncio.Future[Any]:
        """A run's end: status, final message and terminal event together (invariant 11)."""
        return self._submit(writes)

    def record(self, writes: Writes) -> asyncio.Future[Any]:
        """Anything else a run records on its way: steps, tool results, steers, approvals."""
        return self._submit(writes)

    def emit(self, events: list[NewEvent]) -> None:
        """Events nobody waits for (deltas, ``tool.started``): a failure is logged, not raised."""
        self.writer.emit(events)

    def emit_unit(self, fn: Callable[[Connection], Any]) -> None:
        """A function of the connection written without waiting; a failure is logged, not raised."""
        self.writer.submit(fn).add_done_callback(_log_failed_unit)

    def _submit(self, writes: Writes) -> asyncio.Future[Any]:
        return self.writer.submit(ops_of(writes), writes.events, translate=store_error)

    async def create_session(self, row: dict[str, Any], history: list[NewMessage]) -> None:
        unit: list[ops.Op] = [ops.Insert(t.sessions, [row])]
        if history:
            unit.append(ops.Insert(t.messages, [message_row(m) for m in history]))
        await self.writer.submit(unit, translate=store_error)

    async def create_agent(self, row: dict[str, Any]) -> None:
        await self.writer.submit([ops.Insert(t.agents, [row])], translate=store_error)

    async def delete_agent(self, name: str) -> None:
        await self.writer.submit(lambda conn: repo.delete_agent(conn, name), translate=store_error)

    async def join_node(self, node_id: str, url: str) -> int:
        """Register this node of a cluster; its incarnation. Passes the writer's gate (which holds
        every other write until the node has joined)."""
        incarnation = await self.writer.submit(lambda conn: nodes.join(conn, node_id, url), translate=store_error,
                                               gated=False)
        return int(incarnation)

    async def claim_session(self, session_id: str, node_id: str, lease_ttl_s: float) -> nodes.Claim:
        """Take the session's lane for this node unless a live node holds it (a cluster)."""

        def claim(conn: Connection) -> nodes.Claim:
            taken = nodes.claim(conn, session_id, node_id, lease_ttl_s)
            if taken.kind == "adopted":
                self.writer.reset_seq(session_id)  # its last owner wrote events this writer never saw
            return taken

        return await self.writer.submit(claim, translate=store_error)  # type: ignore[no-any-return]

    # --- what the kernel reads -------------------------------------------------------------

    async def session_state(self, session_id: str) -> tuple[Any, tuple[int, float], int]:
        return await self.read(repo.session_state, session_id)

    async def session_by_key(self, owner: str, key: str) -> Any:
        return await self.read(repo.get_session_by_key, owner, key)

    async def run_row(self, run_id: str) -> Any:
        return await self.read(repo.get_run, run_id)

    async def input_by_key(self, session_id: str, key: str) -> Any:
        return await self.read(repo.input_by_idempotency_key, session_id, key)

    async def unfinished_work(self, session_id: str | None = None) -> tuple[list[Any], Any, Any]:
        return await self.read(repo.unfinished_work, session_id)

    async def all_agents(self) -> Any:
        return await self.read(repo.all_agents)

    async def approvals_of_run(self, run_id: str) -> Any:
        return await self.read(repo.approvals_of_run, run_id)

    async def unanswered_client_calls(self, run_ids: list[str]) -> Any:
        return await self.read(repo.unanswered_client_calls, run_ids)

    async def client_calls_by_id(self, call_ids: list[str]) -> Any:
        return await self.read(repo.client_calls_by_id, call_ids)

    async def last_event_seq(self, session_id: str) -> int:
        return await self.read(repo.last_event_seq, session_id)

    async def events_after(self, session_id: str, after: int, *, run_id: str | None = None,
                           limit: int = 1000) -> list[Event]:
        return await self.read(repo.events_after, session_id, after, run_id=run_id, limit=limit)

    async def conversation(self, session_id: str) -> tuple[Any, Any]:
        return await self.read(repo.conversation, session_id)

    async def messages_after(self, session_id: str, after_id: int) -> Any:
        return await self.read(repo.session_messages, session_id, include_rolled_back=False, after_id=after_id)


def _as_stored(row: dict[str, Any]) -> dict[str, Any]:
    """A message row as the columns store it: text made storable (``StoredString``), JSON
    through the engines' codec (a round trip also turns tuples into lists, as a read does)."""
    tool_calls = row["tool_calls"]
    return {**row, "run_id": clean(row["run_id"]), "role": clean(row["role"]), "content": clean(row["content"]),
            "tool_call_id": None if row["tool_call_id"] is None else clean(row["tool_call_id"]),
            "tool_calls": None if tool_calls is None else codec.loads(codec.dumps(tool_calls))}


def store_error(exc: Exception) -> Exception:
    """A driver's failure in the kernel's terms: a broken uniqueness rule is a conflict, a value
    the database cannot hold is rejected data (both permanent for that write); anything else
    (unreachable, locked, a full disk) is a store that cannot write just now."""
    if isinstance(exc, CorralError):
        return exc
    if isinstance(exc, sa_exc.IntegrityError):
        error: Exception = StoreConflict(f"the store refused a duplicate: {_first_line(exc)}")
    elif isinstance(exc, sa_exc.DataError | sa_exc.ProgrammingError) or (
            isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)):
        error = StoreRejected(f"the store refused a value: {_first_line(exc)}")
    else:
        error = StoreUnavailable(f"the store could not write: {_first_line(exc)}")
    error.__cause__ = exc
    return error


def _says_unwritable(error: Exception) -> bool:
    """Whether a failed write says the store cannot write just now (see ``health``), rather than
    that the unit itself was refused, or the writer closed."""
    if isinstance(error, CorralError):
        return isinstance(error, StoreUnavailable)
    if isinstance(error, sa_exc.DBAPIError):
        return isinstance(store_error(error), StoreUnavailable)
    return isinstance(error, OSError)  # the connection failed before the driver said anything


def _probe(conn: Connection) -> None:
    name = f"~probe-{uuid.uuid4().hex}"
    repo.insert_agent(conn, name, {}, utcnow())
    repo.delete_agent(conn, name)


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _log_failed_unit(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a write nobody waited for failed: %s", future.exception())
