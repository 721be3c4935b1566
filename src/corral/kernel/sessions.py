"""Sessions: their rows, their in-memory runtime, and single-flight creation and loading.

The table of runtimes is bounded: beyond ``live_sessions`` the least recently used idle
session is forgotten (its lane is empty and nothing of it is in flight, so the store
holds all of it) and loaded again on its next use.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

from corral.clock import utcnow
from corral.errors import NotFound, StoreConflict
from corral.kernel.lane import Lane
from corral.kernel.ports import KernelStore, Ownership
from corral.kernel.runs import RunHandle
from corral.lru import Lru
from corral.principals import LOCAL
from corral.providers.base import ChatMessage
from corral.records import NewMessage
from corral.types import Disposition, new_id

# A message a new session starts with: (role, content), or a whole message with tool calls or a tool result.
History = tuple[str, str] | ChatMessage


def _seeded(session_id: str, entry: History, now: datetime) -> NewMessage:
    """Messages no run produced carry the empty run id, so no rollback ever touches them."""
    if isinstance(entry, ChatMessage):
        calls = [call.as_json() for call in entry.tool_calls] or None
        return NewMessage(session_id, "", entry.role, entry.content, tool_calls=calls,
                          tool_call_id=entry.tool_call_id, created_at=now)
    role, content = entry
    return NewMessage(session_id, "", role, content, created_at=now)


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
    # Recent Idempotency-Keys; an older key is found in the store (``input_by_key``).
    idempotency: Lru[str, Accepted] = field(default_factory=lambda: Lru(1000))
    # Run ends submitted but not yet committed. While any is, the lane's next run is held
    # (``held``), not started: its start must commit after the end it follows, and if that
    # end's write fails the session must not be handed on (the repair rule, kernel/ending.py).
    unsettled: int = 0
    held: RunHandle | None = None
    # Transitions whose write failed and is being retried: while any is, new inputs are
    # refused with ``StoreUnavailable`` (503, Retry-After) instead of piling up behind it.
    repairing: int = 0

    def __repr__(self) -> str:
        state = f" repairing={self.repairing}" if self.repairing else ""
        return f"<Session {self.id} {self.lane!r}{state}>"

    @property
    def idle(self) -> bool:
        """Nothing of the session is in memory only: forgetting it loses nothing."""
        return (not self.lane.busy and not self.handles and not self.contents and not self.unsettled
                and not self.repairing and self.held is None)


class SessionTable:
    """Creates sessions (one per key, however many ask at once) and loads their runtimes."""

    def __init__(self, store: KernelStore, max_pending: int, on_created: Callable[[dict[str, Any]], None] | None = None,
                 *, capacity: int = 10_000, keys_per_session: int = 1000, ownership: Ownership | None = None,
                 on_adopted: Callable[[SessionRuntime], Awaitable[None]] | None = None):
        self._store = store
        # In a cluster: a session is claimed for this node before its lane is used, and one
        # taken over from nobody is recovered (``on_adopted``) before anyone else sees it.
        self._ownership = ownership
        self._on_adopted = on_adopted
        self._max_pending = max_pending
        self._on_created = on_created
        self.capacity = capacity
        self._keys_per_session = keys_per_session
        # Most recently used last; ``_admit`` evicts idle sessions from the front.
        self._live: OrderedDict[str, SessionRuntime] = OrderedDict()
        self.evictions = 0
        self._loading: dict[str, asyncio.Future[SessionRuntime]] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return f"<SessionTable live={len(self._live)}/{self.capacity} evicted={self.evictions}>"

    def __len__(self) -> int:
        return len(self._live)

    def live(self, session_id: str) -> SessionRuntime | None:
        return self._live.get(session_id)

    def _runtime(self, session_id: str, agent: str, owner: str, last_seq: int, top: float = 0.0,
                 completed: int = 0) -> SessionRuntime:
        return SessionRuntime(session_id, agent, owner, Lane(max_pending=self._max_pending, top_position=top),
                              last_seq, completed_runs=completed, idempotency=Lru(self._keys_per_session))

    def _admit(self, runtime: SessionRuntime) -> SessionRuntime:
        """Keep ``runtime`` (or the one already kept for its id) as the most recently used, and
        forget the least recently used idle sessions beyond capacity. A busy session is never
        forgotten, so the table may stay over capacity while more than that many are busy."""
        kept = self._live.setdefault(runtime.id, runtime)
        self._live.move_to_end(runtime.id)
        excess = len(self._live) - self.capacity
        if excess > 0:
            # Look at a bounded number of the oldest entries, so a table full of busy sessions
            # costs each admission a little, not a scan of the whole table.
            for candidate in list(islice(self._live.values(), excess + 16)):
                if excess <= 0:
                    break
                if candidate is not kept and candidate.idle:
                    del self._live[candidate.id]
                    self.evictions += 1
                    excess -= 1
        return kept

    def all_live(self) -> list[SessionRuntime]:
        return list(self._live.values())

    async def create(
        self,
        agent: str,
        key: str | None,
        metadata: dict[str, Any],
        owner: str = LOCAL.name,
        history: Sequence[History] = (),
    ) -> tuple[dict[str, Any], bool]:
        """The session's row and whether this call created it (invariant 15).

        Keys are per owner: the same key from two principals names two sessions.
        ``history`` (role, content) pairs, or whole messages (an assistant's tool calls, a
        tool's result), become the start of a new session's context, written with the session
        itself; a session that already exists keeps its own.
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
        self, agent: str, key: str, metadata: dict[str, Any], owner: str, history: Sequence[History]
    ) -> tuple[dict[str, Any], bool]:
        existing = await self._store.session_by_key(owner, key)
        if existing is not None:
            return dict(existing._mapping), False
        try:
            return await self._insert(agent, key, metadata, owner, history), True
        except StoreConflict:
            existing = await self._store.session_by_key(owner, key)  # another process won the race
            if existing is None:
                raise
            return dict(existing._mapping), False

    async def _insert(
        self, agent: str, key: str | None, metadata: dict[str, Any], owner: str, history: Sequence[History]
    ) -> dict[str, Any]:
        session_id, now = new_id("ses"), utcnow()
        row = {"id": session_id, "agent": agent, "owner": owner, "key": key, "metadata": metadata, "created_at": now,
               "title": None, "summary": None}
        if self._ownership is not None:
            row["node_id"] = self._ownership.node_id  # its creator's lane holds it
        # Messages no run produced: they carry the empty run id, so no rollback ever touches them.
        messages = [_seeded(session_id, entry, now) for entry in history]
        await self._store.create_session(row, messages)
        self._admit(self._runtime(session_id, agent, owner, 0))
        if self._on_created is not None:
            self._on_created(row)
        return row

    async def get(self, session_id: str) -> SessionRuntime:
        """The session's runtime, loaded once however many callers ask at the same time."""
        runtime = self._live.get(session_id)
        if runtime is not None:
            self._live.move_to_end(session_id)
            return runtime
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SessionRuntime] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = future
        try:
            adopted = await self._ownership.claim(session_id) if self._ownership is not None else False
            row, (last_seq, top), completed = await self._store.session_state(session_id)
            if row is None:
                raise NotFound(f"no session {session_id!r}")
            loaded = self._runtime(session_id, row.agent, row.owner, last_seq, top, completed)
            if adopted and self._on_adopted is not None:
                await self._on_adopted(loaded)
            runtime = self._admit(loaded)
            future.set_result(runtime)
            return runtime
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._loading[session_id]
