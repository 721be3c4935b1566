"""Client tools: a run waits, holding nothing, for the results of calls of the client's own tools.

A client's request (the OpenAI endpoints) may bring tools of its own (``ModelOptions``). The step
loop offers them to the model beside the agent's tools, and a call of one parks the run in
``waiting`` -- holding no provider or tool slot, like an approval (``Driver._park``) -- until the
client sends the result in a later request. What this module does with such a run:

- ``locate``: find the run that made some calls (a client that pins no session is known only by
  the ids of the calls it answers);
- ``answer``: record the client's results (each a tool message and the call's ``tool.completed``,
  in one write) and resume the run once it waits for nothing else;
- ``abandon``: the client moved on without the results (a new message in the same session): the
  run is cancelled, and the new message runs after it;
- a timer per parked run (``KernelConfig.client_tools_timeout_s``) cancels a run whose client never
  answers (a client that only wanted the call's arguments, as structured output by function calling
  does), so a forgotten call does not hold its session forever. Recovery starts the timer again with
  what was left of it: a run waiting for results stays waiting across a restart.

The repair rule: if the results' write fails, the calls stand again as pending and the caller gets
the error; it may send the results again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from corral.clock import utcnow
from corral.errors import Conflict, NotFound
from corral.events import NewEvent
from corral.kernel.runs import CancelReason, RunHandle
from corral.records import ClientResult, NewMessage, RunChange, Writes
from corral.text import clean
from corral.types import CancelMode, EventType, RunStatus

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel
    from corral.providers.base import ModelOptions, ToolCall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    """A run that made some client calls, as the store has it."""

    run_id: str
    session_id: str
    owner: str
    agent: str
    status: RunStatus
    # Of the calls asked about: those the run still waits for, and those already answered.
    pending: frozenset[str]
    answered: frozenset[str]


@dataclass(frozen=True)
class Answered:
    """The client's results were recorded."""

    run_id: str
    session_id: str
    # The session's newest event seq before the results' write: what the resumed run does comes after.
    after: int
    # Client calls the run still waits for (a client that answered only some).
    pending: frozenset[str]


class ClientTools:
    def __init__(self, kernel: Kernel):
        self._k = kernel

    async def locate(self, call_ids: Collection[str], *, owner: str | None = None,
                     agent: str | None = None) -> Located | None:
        """The run that made every one of ``call_ids`` (of ``owner``'s sessions of ``agent``, when
        given); one that still waits for them is preferred. None if no run made them all."""
        if not call_ids:
            return None
        rows = await self._k.store.client_calls_by_id(sorted(set(call_ids)))
        by_run: dict[str, list[Any]] = {}
        for row in rows:
            if (owner is None or row.owner == owner) and (agent is None or row.agent == agent):
                by_run.setdefault(row.run_id, []).append(row)
        found: list[Located] = []
        for run_id, calls in by_run.items():
            ids = {c.call_id for c in calls}
            if ids != set(call_ids):
                continue
            first = calls[0]
            pending = frozenset(c.call_id for c in calls if c.answered_at is None)
            found.append(Located(run_id, first.session_id, first.owner, first.agent, RunStatus(first.run_status),
                                 pending, frozenset(ids) - pending))
        found.sort(key=lambda located: (located.pending != frozenset(call_ids), located.status.is_terminal))
        return found[0] if found else None

    async def waiting_on_any(self, call_ids: Collection[str], *, owner: str | None = None,
                             agent: str | None = None) -> set[str]:
        """The runs (of ``owner``'s sessions of ``agent``, when given) still waiting for the result of
        one of ``call_ids``."""
        if not call_ids:
            return set()
        rows = await self._k.store.client_calls_by_id(sorted(set(call_ids)))
        return {row.run_id for row in rows if row.answered_at is None and not RunStatus(row.run_status).is_terminal
                and (owner is None or row.owner == owner) and (agent is None or row.agent == agent)}

    async def answer(self, run_id: str, results: Mapping[str, str], *,
                     model_options: ModelOptions | None = None) -> Answered:
        """Record the client's ``results`` (call id -> text) of a run waiting for them, and resume the
        run once it waits for nothing else. ``model_options`` (the answering request's own tools,
        tool_choice, response_format) replace the run's from here on.

        ``NotFound``: no such run, or it waits for no result of one of these calls (never made, or
        answered already); ``Conflict``: the run has ended; the store's errors leave the calls pending.
        """
        if not results:
            raise NotFound("no result to record")
        k = self._k
        handle = await k.control.handle_of(run_id)
        self._check(handle, results)
        after = await k.store.last_event_seq(handle.session_id)
        self._check(handle, results)  # the read awaited: another request may have answered meanwhile
        calls = [handle.pending_client_calls.pop(call_id) for call_id in results]
        writes = self._writes(handle, calls, results, model_options)
        try:
            await k.store.record(writes)
        except BaseException:
            if not handle.finished.is_set():  # not recorded, so not answered: the calls stand again
                handle.pending_client_calls.update({call.id: call for call in calls})
            raise
        if model_options is not None:
            handle.slot.model_options = model_options
            handle.choice_pending = True  # the answering request's tool_choice binds the next model call
        if not handle.pending_client_calls:
            if handle.client_timer is not None:
                handle.client_timer.cancel()
                handle.client_timer = None
            if (not handle.pending_approvals and handle.status is RunStatus.WAITING and handle.task is None
                    and not handle.finished.is_set()):
                k.driver.start(handle, resume=True)
        return Answered(run_id, handle.session_id, after, frozenset(handle.pending_client_calls))

    async def abandon(self, run_id: str) -> None:
        """The client moved on without the results: cancel the run waiting for them (if it still is)."""
        handle = self._k.runs.get(run_id)
        if handle is None or handle.finished.is_set() or not handle.pending_client_calls:
            return
        handle.cancel_reason = handle.cancel_reason or CancelReason.CLIENT_MOVED_ON
        await self._cancel(run_id)

    async def abandon_in(self, session_id: str) -> None:
        """``abandon`` the session's run that waits for its client's results, if it has one."""
        parked = self.pending_in(session_id)
        if parked is not None:
            await self.abandon(parked.run_id)

    def pending_in(self, session_id: str) -> RunHandle | None:
        """The session's active run, if it waits for results of client calls."""
        runtime = self._k.sessions.live(session_id)
        if runtime is None or runtime.lane.active is None:
            return None
        handle = self._k.runs.get(runtime.lane.active.run_id)
        return handle if handle is not None and handle.pending_client_calls else None

    # --- the wait's end, if the client never answers ---------------------------------------------

    def start_timer(self, handle: RunHandle, *, since: datetime | None = None) -> None:
        """Cancel the run if its client calls are still pending ``client_tools_timeout_s`` after
        ``since`` (default: now)."""
        timeout = self._k.config.client_tools_timeout_s
        if not timeout:
            return
        if handle.client_timer is not None:
            handle.client_timer.cancel()
        waited = (utcnow() - since).total_seconds() if since is not None else 0.0
        handle.client_timer = asyncio.get_running_loop().call_later(max(0.0, timeout - waited), self._expire, handle)

    def _expire(self, handle: RunHandle) -> None:
        handle.client_timer = None
        if handle.finished.is_set() or not handle.pending_client_calls or not self._k.accepting:
            return
        log.info("run %s: no result of its client calls in %s s; cancelling it", handle.run_id,
                 self._k.config.client_tools_timeout_s)
        handle.cancel_reason = handle.cancel_reason or CancelReason.CLIENT_TIMEOUT
        self._k.supervisor.spawn(self._cancel(handle.run_id), f"client-timeout:{handle.run_id}")

    async def _cancel(self, run_id: str) -> None:
        try:
            await self._k.control.cancel(run_id, CancelMode.SOFT)
        except (NotFound, Conflict):
            pass  # it ended on its own meanwhile

    # --- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _check(handle: RunHandle, results: Mapping[str, str]) -> None:
        if handle.finished.is_set():
            raise Conflict(f"run {handle.run_id} already ended ({handle.status.value})")
        unknown = sorted(set(results) - set(handle.pending_client_calls))
        if unknown:
            raise NotFound(f"run {handle.run_id} waits for no result of call(s) {', '.join(unknown)}")

    @staticmethod
    def _writes(handle: RunHandle, calls: list[ToolCall], results: Mapping[str, str],
                model_options: ModelOptions | None) -> Writes:
        sid, run_id, now = handle.session_id, handle.run_id, utcnow()
        texts = {call.id: clean(results[call.id]) for call in calls}
        writes = Writes(
            messages=[NewMessage(sid, run_id, "tool", texts[c.id], tool_call_id=c.id) for c in calls],
            client_results=[ClientResult(run_id, c.id, now) for c in calls],
            events=[NewEvent(sid, EventType.TOOL_COMPLETED, run_id, {"call_id": c.id, "tool": c.name,
                                                                     "result": texts[c.id], "is_error": False,
                                                                     "client": True}) for c in calls],
        )
        if model_options is not None:
            writes.run_changes.append(RunChange(run_id, model_options=model_options.as_json()))
        return writes
