"""Who stops what: cancels, interrupts and approval decisions.

Control messages bypass every queue (invariant 13): each acts on the run's handle at
once, synchronously where it can, and writes only what the decision itself needs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from corral.clock import utcnow
from corral.errors import Conflict, NotFound
from corral.events import NewEvent
from corral.kernel.ending import cancel_error
from corral.kernel.repair import refused_while_repairing
from corral.kernel.runs import CancelReason, RunHandle
from corral.records import Resolution, Writes
from corral.types import ApprovalStatus, CancelMode, Decision, EventType, RunStatus

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel


class Control:
    def __init__(self, kernel: Kernel):
        self._k = kernel

    async def cancel(self, run_id: str, mode: CancelMode) -> RunStatus:
        """Cancel a run; returns its status at the moment the request took effect."""
        handle = self._k.runs.get(run_id) or await self._handle_elsewhere(run_id)
        handle.cancel_reason = handle.cancel_reason or CancelReason.USER
        await self._cancel_handle(handle, mode)
        return handle.status

    def cancel_soon(self, run_id: str, mode: CancelMode) -> None:
        """Cancel from a context that cannot await (an observer going away)."""
        if run_id in self._k.runs and self._k.accepting:
            self._k.supervisor.spawn(self._cancel_quietly(run_id, mode), f"cancel:{run_id}")

    async def _cancel_quietly(self, run_id: str, mode: CancelMode) -> None:
        try:
            await self.cancel(run_id, mode)
        except (NotFound, Conflict):
            pass  # it ended on its own meanwhile: nothing left to cancel

    async def _cancel_handle(self, handle: RunHandle, mode: CancelMode) -> None:
        ending, stop_status = self._k.ending, self._k.driver.stop_status
        if handle.status is RunStatus.QUEUED and handle.task is None:
            handle.request_cancel(mode)
            await ending.end(handle, RunStatus.CANCELLED, error=cancel_error(handle))
        elif handle.status is RunStatus.WAITING and handle.task is None:
            handle.request_cancel(mode)
            await ending.end(handle, stop_status(handle), error=cancel_error(handle))
        elif mode is CancelMode.HARD or handle.status is RunStatus.QUEUED or (
                handle.status is RunStatus.WAITING and not handle.approval_waiters):
            # A run waiting with a task (on its subagents) sits at a boundary: stopping it loses nothing.
            self.hard_cancel(handle)
        else:
            handle.request_cancel(CancelMode.SOFT)

    def hard_cancel(self, handle: RunHandle) -> None:
        handle.request_cancel(CancelMode.HARD)
        if handle.task is not None and not handle.task.done():
            handle.task.cancel(handle.cancel_reason)

    def interrupt(self, run_id: str, *, roll_back: bool) -> None:
        handle = self._k.runs.get(run_id)
        if handle is None:
            return
        handle.roll_back = handle.roll_back or roll_back
        handle.cancel_reason = handle.cancel_reason or CancelReason.INTERRUPTED
        if handle.task is None:
            self._k.supervisor.spawn(self._cancel_handle(handle, CancelMode.SOFT), f"interrupt:{run_id}")
            return
        if handle.status is RunStatus.QUEUED:
            self.hard_cancel(handle)
            return
        handle.request_cancel(CancelMode.SOFT)
        if handle.hard_timer is None:
            handle.hard_timer = asyncio.get_running_loop().call_later(
                self._k.config.interrupt_grace_s, self.hard_cancel, handle
            )

    async def decide(self, run_id: str, call_id: str, decision: Decision) -> None:
        handle = self._k.runs.get(run_id) or await self._handle_elsewhere(run_id)
        if call_id not in handle.pending_approvals:
            raise NotFound(f"run {run_id} has no pending approval for call {call_id!r}")
        handle.pending_approvals.discard(call_id)
        status = ApprovalStatus.APPROVED if decision is Decision.APPROVE else ApprovalStatus.DENIED
        try:
            await self._k.store.record(Writes(
                resolutions=[Resolution(run_id, call_id, status, utcnow())],
                events=[NewEvent(handle.session_id, EventType.APPROVAL_RESOLVED, run_id,
                                 {"call_id": call_id, "decision": decision.value})],
            ))
        except BaseException:
            # Not recorded, so not decided: the question stands, and the caller may answer again.
            if not handle.finished.is_set():
                handle.pending_approvals.add(call_id)
            raise
        waiter = handle.approval_waiters.get(call_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)  # a run that stayed alive for this answer (an ACP agent's)
            return
        if (not handle.pending_approvals and not handle.pending_client_calls and handle.status is RunStatus.WAITING
                and handle.task is None):
            self._k.driver.start(handle, resume=True)

    async def handle_of(self, run_id: str) -> RunHandle:
        """An unfinished run's handle (see ``_handle_elsewhere`` for a run this node does not hold)."""
        return self._k.runs.get(run_id) or await self._handle_elsewhere(run_id)

    async def _handle_elsewhere(self, run_id: str) -> RunHandle:
        """A run this node does not hold: ended (``Conflict``), unknown (``NotFound``), or, in a
        cluster, one whose session lives on another node (``OwnedElsewhere``, from loading the
        session) or on none (then this node takes the session over, and the run with it)."""
        row = await self._k.store.run_row(run_id)
        if row is None:
            raise NotFound(f"no run {run_id!r}")
        if not RunStatus(row.status).is_terminal and self._k.ownership is not None:
            await self._k.sessions.get(row.session_id)
            handle = self._k.runs.get(run_id)
            if handle is not None:
                return handle
        runtime = self._k.sessions.live(row.session_id)
        if not RunStatus(row.status).is_terminal and runtime is not None and runtime.repairing:
            raise refused_while_repairing(runtime)  # its recovery waits for the store: not loaded yet
        raise Conflict(f"run {run_id} already ended ({row.status})")
