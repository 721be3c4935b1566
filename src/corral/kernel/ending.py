"""How a run ends: one synchronous transition, then its write, repaired until it commits.

``decide`` is the transition: atomic on the event loop, it moves the run to its final
status, takes it off its session's lane (untaken steers become the next run; an
interrupted run's inputs go back to the front) and returns the :class:`Closing` that the
store must still record: status, final message and terminal event in one unit
(invariant 11). The lane's next run is *held*, not started, until that unit commits: a
next run whose start committed before the end it follows would break the one-active-run
index, and an end that fails must not be handed on (``kernel/repair.py``).

The write is submitted in the transition's step; what follows its commit (starting the
held run, telling the run-end listeners) runs from the write's own callback, and a repair
in a task of its own, so a hard cancel of the run's task can cut neither short.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.clock import utcnow
from corral.errors import CorralError
from corral.events import NewEvent
from corral.kernel.lane import Slot
from corral.kernel.repair import write_until_committed
from corral.kernel.runs import CancelReason, RunEnd, RunHandle, new_run
from corral.kernel.sessions import SessionRuntime
from corral.records import InputMove, NewMessage, RunChange, Writes
from corral.types import TERMINAL_EVENT, EventType, InputStatus, RunStatus, new_id

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel

log = logging.getLogger(__name__)


@dataclass
class Closing:
    """A run's end as decided in memory, and what the store must still record of it."""

    runtime: SessionRuntime
    handle: RunHandle
    status: RunStatus
    output: str | None
    error: dict[str, Any] | None
    writes: Writes
    # What is written instead if the store rejects ``writes`` for good: the run failed, its
    # output left out (the likeliest culprit), everything else (re-queued inputs) kept.
    simpler: Writes
    continued: bool
    completed_runs: int
    committed: asyncio.Event = field(default_factory=asyncio.Event)


def error_of(exc: CorralError) -> dict[str, Any]:
    return {"code": exc.code, "message": str(exc)}


def cancel_error(handle: RunHandle) -> dict[str, Any]:
    return {"code": "cancelled", "message": handle.cancel_reason or CancelReason.USER}


class Ending:
    def __init__(self, kernel: Kernel):
        self._k = kernel
        # Ends whose write failed and is being repaired: shutdown waits for them, bounded.
        self.repairing: set[asyncio.Task[None]] = set()

    async def end(self, handle: RunHandle, status: RunStatus, *, text: str | None = None,
                  error: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> None:
        """End the run (if it has not ended) and wait until its end is recorded."""
        if handle.finished.is_set():
            return
        if handle.begun is not None and not handle.begun.done():
            await asyncio.shield(handle.begun)  # its start is still being written: the end goes after it
            if handle.finished.is_set():
                return
        runtime = await self._k.sessions.get(handle.session_id)
        closing = self.decide(runtime, handle, status, text=text, error=error, usage=usage)
        if closing is None:
            return
        # Submitted in the transition's step (FIFO after its run's writes). On the happy path its
        # outcome is handled by a callback, with no task of its own; a failure starts the repair.
        first = self._k.store.end_run(closing.writes)
        first.add_done_callback(lambda done: self._first_written(closing, done))
        await closing.committed.wait()

    def crashed(self, handle: RunHandle, exc: Exception) -> None:
        """A run's own scope caught ``exc``: the run fails with it, no other run is touched."""
        if handle.finished.is_set() or not self._k.supervisor.is_open:
            return
        error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        self._k.supervisor.spawn(self.end(handle, RunStatus.FAILED, error=error), f"failed:{handle.run_id}")

    def decide(self, runtime: SessionRuntime, handle: RunHandle, status: RunStatus, *, text: str | None,
               error: dict[str, Any] | None, usage: dict[str, int] | None) -> Closing | None:
        """The transition: synchronous, so no other transition of the session interleaves."""
        if handle.finished.is_set():
            return None
        began = handle.status.is_active and not (handle.begun is not None and handle.begun.result() is False)
        handle.move(status)
        if handle.hard_timer is not None:
            handle.hard_timer.cancel()
        if handle.client_timer is not None:
            handle.client_timer.cancel()
        handle.finished.set()
        for waiter in handle.approval_waiters.values():
            waiter.cancel()  # a question of a finished run has nobody left to ask
        self._k.runs.pop(handle.run_id, None)
        runtime.handles.pop(handle.run_id, None)
        queued_slot = runtime.lane.cancel_queued(handle.run_id)
        handover = runtime.lane.finish(handle.run_id, lambda: new_id("run"))
        requeue: Slot | None = None
        if status is RunStatus.INTERRUPTED and began and self._k.config.requeue_interrupted and handle.slot.input_ids:
            requeue = Slot(new_id("run"), handle.slot.position - 0.5, list(handle.slot.input_ids),
                           handle.slot.policy, urgent=True, model_options=handle.slot.model_options)
        if status is RunStatus.COMPLETED:
            runtime.completed_runs += 1  # here, before the write: counted in commit order
        unstarted = queued_slot is not None or not began
        if unstarted:
            for input_id in handle.slot.input_ids:
                runtime.contents.pop(input_id, None)
        roll_back = began and (handle.roll_back or requeue is not None)
        if roll_back:
            self._k.conversations.forget(runtime.id)
        new_runs = [slot for slot in (handover.requeued, requeue) if slot is not None]
        carried = _carried(runtime, handle, unstarted=unstarted, roll_back=roll_back,
                           requeued=handover.requeued, requeue=requeue, new_runs=new_runs)
        writes = _final(runtime.id, handle.run_id, status, text, error, usage) + carried
        failure = {"code": "store_rejected", "message": f"the run ended ({status.value}) but the store refused "
                                                        "its end; recorded as failed without its output"}
        simpler = _final(runtime.id, handle.run_id, RunStatus.FAILED, None, failure, None) + carried
        if handover.requeued is not None:
            self._k.register(runtime, RunHandle(handover.requeued.run_id, runtime.id, handover.requeued))
            self._k.hub.heads.track(handover.requeued.run_id, runtime.id)
        runtime.unsettled += 1
        if handover.to_start is not None:
            runtime.held = runtime.handles[handover.to_start.run_id]
        return Closing(runtime, handle, status, text or None, error, writes, simpler, continued=requeue is not None,
                       completed_runs=runtime.completed_runs)

    def _first_written(self, closing: Closing, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._settle(closing, closing.writes)
            return
        task = self._k.supervisor.spawn(self._repair(closing, done), f"repair-end:{closing.handle.run_id}")
        self.repairing.add(task)
        task.add_done_callback(self.repairing.discard)

    async def _repair(self, closing: Closing, failed: asyncio.Future[Any]) -> None:
        """The end's first write failed: write it (or its simpler form) until it commits."""
        try:
            committed = await write_until_committed(
                self._k.store.end_run, closing.writes, closing.runtime, self._k.config,
                what=f"the end of run {closing.handle.run_id}", simpler=closing.simpler, first=failed)
        except BaseException:
            self._give_up(closing)  # cancelled at shutdown: the run stays active in the store for recovery
            raise
        if committed is None:  # not even the simpler form was taken (it always is, unless the store is broken)
            self._give_up(closing)
            return
        self._settle(closing, committed)

    @staticmethod
    def _give_up(closing: Closing) -> None:
        closing.runtime.unsettled -= 1
        closing.committed.set()
        closing.handle.recorded.set()

    def _settle(self, closing: Closing, committed: Writes) -> None:
        """The end is recorded: hand the session on and tell the listeners."""
        runtime, handle = closing.runtime, closing.handle
        runtime.unsettled -= 1
        closing.committed.set()
        handle.recorded.set()
        status, output, error = closing.status, closing.output, closing.error
        if committed is closing.simpler:
            status, output, error = RunStatus.FAILED, None, closing.simpler.run_changes[0].error
        self.start_held(runtime)
        ended = RunEnd(handle.session_id, handle.run_id, status, output, error, continued=closing.continued,
                       completed_runs=closing.completed_runs)
        self._k.metrics.runs_ended.labels(status.value).inc()
        for listener in self._k.run_end_listeners:
            try:
                listener(ended)
            except Exception:  # a listener's bug is its own: the run has ended, whatever it thinks
                log.exception("a run-end listener failed for run %s", handle.run_id)

    def start_held(self, runtime: SessionRuntime) -> None:
        """Start the session's held run once no end of the session is still being written."""
        if runtime.unsettled or runtime.held is None:
            return
        held, runtime.held = runtime.held, None
        if held.run_id in runtime.handles and not held.finished.is_set():
            self._k.driver.start(held)


def _final(session_id: str, run_id: str, status: RunStatus, text: str | None, error: dict[str, Any] | None,
           usage: dict[str, int] | None) -> Writes:
    """The run's own end: its status, final message and terminal event."""
    writes = Writes(run_changes=[RunChange(run_id, status=status, output=text or None, error=error, usage=usage,
                                           ended_at=utcnow())])
    if text:
        writes.messages.append(NewMessage(session_id, run_id, "assistant", text))
        writes.events.append(NewEvent(session_id, EventType.MESSAGE_COMPLETED, run_id,
                                      {"role": "assistant", "content": text}))
    body: dict[str, Any] = {"status": status.value}
    if text:
        body["output"] = text
    if error:
        body["error"] = error
    if usage:
        body["usage"] = usage
    writes.events.append(NewEvent(session_id, TERMINAL_EVENT[status], run_id, body))
    return writes


def _carried(runtime: SessionRuntime, handle: RunHandle, *, unstarted: bool, roll_back: bool,
             requeued: Slot | None, requeue: Slot | None, new_runs: list[Slot]) -> Writes:
    """What the end hands on: inputs cancelled or moved to the runs that now carry them."""
    run_id, now = handle.run_id, utcnow()
    writes = Writes(runs=[new_run(runtime.id, slot, now) for slot in new_runs])
    if unstarted:
        writes.input_moves.append(InputMove(list(handle.slot.input_ids), InputStatus.CANCELLED))
    if roll_back:
        writes.roll_backs.append(run_id)
    if requeued is not None:
        writes.input_moves.append(InputMove(list(requeued.input_ids), InputStatus.PENDING, requeued.run_id))
    if requeue is not None:
        writes.input_moves.append(InputMove(list(requeue.input_ids), InputStatus.PENDING, requeue.run_id))
    for slot in new_runs:
        writes.events.append(NewEvent(runtime.id, EventType.INPUT_REQUEUED, slot.run_id,
                                      {"input_ids": list(slot.input_ids), "from_run_id": run_id,
                                       "run_id": slot.run_id}))
        writes.events.append(NewEvent(runtime.id, EventType.RUN_QUEUED, slot.run_id,
                                      {"input_ids": list(slot.input_ids)}))
    return writes
