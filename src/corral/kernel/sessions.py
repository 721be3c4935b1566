"""Sessions: their rows, their in-memory runtime, and single-flight creation and loading."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from corral.clock import utcnow
from corral.errors import NotFound
from corral.kernel.lane import Lane
from corral.kernel.runs import RunHandle
from corral.principals import LOCAL
from corral.store import Store, ops, repo
from corral.store import tables as t
from corral.types import Disposition, new_id


@dataclass(frozen=True)
class Accepted:
    """What an accepted input became; returned again for a repeated Idempotency-Key."""

    session_id: str
    input_id: str
    run_id: str
    disposition: Disposition
    duplicate: bool = False


@dataclass(eq=False)
class SessionRuntime:
    """A session as the kernel holds it while it is in use. Only the kernel mutates it."""

    id: str
    agent: str
    owner: str
    lane: Lane
    last_input_seq: int
    # Runs of the session that completed (counted from the store at load, then here).
    completed_runs: int = 0
    # Content of inputs accepted but not yet consumed by a run.
    contents: dict[str, str] = field(default_factory=dict)
    # Unfinished runs of this session, queued or active.
    handles: dict[str, RunHandle] = field(default_factory=dict)
    idempotency: dict[str, Accepted] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.lane!r}>"


class SessionTable:
    """Creates sessions (one per key, however many ask at once) and loads their runtimes."""

    def __init__(self, store: Store, max_pending: int, on_created: Callable[[dict[str, Any]], None] | None = None):
        self._store = store
        self._max_pending = max_pending
        self._on_created = on_created
        self._live: dict[str, SessionRuntime] = {}
        self._loading: dict[str, asyncio.Future[SessionRuntime]] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return f"<SessionTable live={len(self._live)}>"

    def live(self, session_id: str) -> SessionRuntime | None:
        return self._live.get(session_id)

    def all_live(self) -> list[SessionRuntime]:
        return list(self._live.values())

    async def create(
        self,
        agent: str,
        key: str | None,
        metadata: dict[str, Any],
        owner: str = LOCAL.name,
        history: Sequence[tuple[str, str]] = (),
    ) -> tuple[dict[str, Any], bool]:
        """The session's row and whether this call created it (invariant 15).

        Keys are per owner: the same key from two principals names two sessions.
        ``history`` (role, content) pairs become the start of a new session's context,
        written with the session itself; a session that already exists keeps its own.
        """
        if key is None:
            return await self._insert(agent, None, metadata, owner, history), True
        pending = self._creating.get((owner, key))
        if pending is not None:
            return dict(await asyncio.shield(pending)), False
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._creating[owner, key] = future
        try:
            row, created = await self._get_or_insert(agent, key, metadata, owner, history)
            future.set_result(row)
            return row, created
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here; waiters re-raise it
            raise
        finally:
            del self._creating[owner, key]

    async def _get_or_insert(
        self, agent: str, key: str, metadata: dict[str, Any], owner: str, history: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, Any], bool]:
        existing = await self._store.read(repo.get_session_by_key, owner, key)
        if existing is not None:
            return dict(existing._mapping), False
        try:
            return await self._insert(agent, key, metadata, owner, history), True
        except IntegrityError:
            existing = await self._store.read(repo.get_session_by_key, owner, key)  # another process won the race
            if existing is None:
                raise
            return dict(existing._mapping), False

    async def _insert(
        self, agent: str, key: str | None, metadata: dict[str, Any], owner: str, history: Sequence[tuple[str, str]]
    ) -> dict[str, Any]:
        session_id, now = new_id("ses"), utcnow()
        row = {"id": session_id, "agent": agent, "owner": owner, "key": key, "metadata": metadata, "created_at": now,
               "title": None, "summary": None}
        unit: list[ops.Op] = [ops.Insert(t.sessions, [row])]
        if history:
            # Messages no run produced: they carry the empty run id, so no rollback ever touches them.
            unit.append(ops.Insert(t.messages, [
                {"session_id": session_id, "run_id": "", "input_id": None, "role": role, "content": content,
                 "tool_calls": None, "tool_call_id": None, "rolled_back": False, "created_at": now}
                for role, content in history
            ]))
        await self._store.write(unit)
        self._live[session_id] = SessionRuntime(session_id, agent, owner, Lane(max_pending=self._max_pending), 0)
        if self._on_created is not None:
            self._on_created(row)
        return row

    async def get(self, session_id: str) -> SessionRuntime:
        """The session's runtime, loaded once however many callers ask at the same time."""
        runtime = self._live.get(session_id)
        if runtime is not None:
            return runtime
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SessionRuntime] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = future
        try:
            row, (last_seq, top), completed = await self._store.read(repo.session_state, session_id)
            if row is None:
                raise NotFound(f"no session {session_id!r}")
            lane = Lane(max_pending=self._max_pending, top_position=top)
            loaded = SessionRuntime(session_id, row.agent, row.owner, lane, last_seq, completed_runs=completed)
            runtime = self._live.setdefault(session_id, loaded)
            future.set_result(runtime)
            return runtime
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._loading[session_id]
