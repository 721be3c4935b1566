"""Start-up recovery: no run is left `running`, no accepted input is left behind.

What the store says at start:
- `running` runs were cut off mid-flight: each becomes `interrupted` (with its event),
  its messages are rolled back out of the context, and by default its inputs move to
  a new queued run at the front of the session's queue (invariant 12);
- `waiting` runs keep waiting for their approvals and their client's tool results, holding
  nothing (the wait for a client starts its timer again, with what was left of it);
- `queued` runs are rebuilt into their session's lane in order and the head starts.

A store that refuses the interruption's write (a full disk) does not stop the start: the
session is held (new inputs get 503 with Retry-After) and the write is repaired in the
background until it commits, and only then is the lane rebuilt (the repair rule).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from corral.clock import utcnow
from corral.errors import StoreUnavailable
from corral.events import NewEvent
from corral.kernel.lane import Slot
from corral.kernel.repair import write_until_committed
from corral.kernel.runs import RunHandle, new_run
from corral.providers.base import ModelOptions, ToolCall
from corral.records import InputMove, RunChange, Writes
from corral.types import EventType, ExecPolicy, InputStatus, RunStatus, new_id

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel
    from corral.kernel.sessions import SessionRuntime

log = logging.getLogger(__name__)

INTERRUPTED_ERROR = {"code": "interrupted", "message": "the server stopped while the run was active"}


async def recover(kernel: Kernel) -> None:
    """Recover every session (one node: all of them are this node's)."""
    runs, inputs, approvals = await kernel.store.unfinished_work()
    client_calls = await _client_calls(kernel, runs)
    for session_id, work in _by_session(runs, inputs, approvals, client_calls).items():
        await _recover_session(kernel, await kernel.sessions.get(session_id), *work)


async def recover_session(kernel: Kernel, runtime: SessionRuntime) -> None:
    """Recover one session this node has just taken over (a cluster: from a node that left or
    died, or from nobody), before its lane serves anything."""
    runs, inputs, approvals = await kernel.store.unfinished_work(runtime.id)
    work = _by_session(runs, inputs, approvals, await _client_calls(kernel, runs)).get(runtime.id)
    if work is not None:
        await _recover_session(kernel, runtime, *work)


Work = tuple[list[Any], dict[str, list[Any]], dict[str, set[str]], dict[str, list[Any]]]


async def _client_calls(kernel: Kernel, runs: list[Any]) -> Any:
    """The client calls that waiting runs still wait for."""
    waiting = [run.id for run in runs if run.status == RunStatus.WAITING.value]
    return await kernel.store.unanswered_client_calls(waiting) if waiting else []


def _by_session(runs: list[Any], inputs: Any, approvals: Any, client_calls: Any) -> dict[str, Work]:
    inputs_by_run: dict[str, list[Any]] = defaultdict(list)
    for row in inputs:
        inputs_by_run[row.run_id].append(row)
    pending_by_run: dict[str, set[str]] = defaultdict(set)
    for row in approvals:
        pending_by_run[row.run_id].add(row.call_id)
    client_by_run: dict[str, list[Any]] = defaultdict(list)
    for row in client_calls:
        client_by_run[row.run_id].append(row)
    by_session: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        by_session[run.session_id].append(run)
    return {sid: (session_runs, inputs_by_run, pending_by_run, client_by_run)
            for sid, session_runs in by_session.items()}


async def _recover_session(
    kernel: Kernel,
    runtime: SessionRuntime,
    runs: list[Any],
    inputs_by_run: dict[str, list[Any]],
    pending_by_run: dict[str, set[str]],
    client_by_run: dict[str, list[Any]],
) -> None:
    """Interrupt what was running (one write), then rebuild the lane. If the store refuses the
    write for now (a full disk), the session is held -- new inputs get 503 with Retry-After --
    and the write is repaired in the background until it commits; the lane is rebuilt then."""
    plan = _plan(kernel, runtime.id, runs, inputs_by_run, pending_by_run, client_by_run)
    if plan.writes is not None:
        try:
            await kernel.store.end_run(plan.writes)
        except StoreUnavailable as exc:
            log.warning("session %s: the interruption of its cut-off run could not be written (%s); "
                        "the session is held until the store takes it", runtime.id, exc)
            runtime.repairing += 1  # in this step: nothing reaches the empty lane meanwhile
            kernel.readiness.defer("session recovery", _recover_later(kernel, runtime, plan))
            return
    _restore(kernel, runtime, plan)


async def _recover_later(kernel: Kernel, runtime: SessionRuntime, plan: _Plan) -> None:
    assert plan.writes is not None
    committed = await write_until_committed(kernel.store.end_run, plan.writes, runtime, kernel.config,
                                            what=f"the recovery of session {runtime.id}")
    if committed is None:  # refused for good: the session stays held (a restart tries again)
        log.error("session %s: the store refused its recovery; it takes no inputs until a restart", runtime.id)
        return
    _restore(kernel, runtime, plan)
    runtime.repairing -= 1
    log.info("session %s recovered once the store took writes again", runtime.id)


@dataclass
class _Plan:
    """A session's recovery: the write that interrupts its cut-off run (if one was running),
    and the lane it rebuilds once that write is committed."""

    writes: Writes | None = None
    contents: dict[str, str] = field(default_factory=dict)
    queued: list[Slot] = field(default_factory=list)
    active: Slot | None = None
    waiting: RunHandle | None = None
    # When the oldest client call the waiting run waits for was made (its timer counts from then).
    client_since: datetime | None = None


def _plan(kernel: Kernel, session_id: str, runs: list[Any], inputs_by_run: dict[str, list[Any]],
          pending_by_run: dict[str, set[str]], client_by_run: dict[str, list[Any]]) -> _Plan:
    plan = _Plan()
    for run in runs:
        rows = inputs_by_run.get(run.id, [])
        for row in rows:
            if row.status == InputStatus.PENDING.value or run.status == RunStatus.RUNNING.value:
                plan.contents[row.id] = row.content
        status = RunStatus(run.status)
        if status is RunStatus.RUNNING:
            writes, requeue = _interrupt(kernel, session_id, run, rows)
            plan.writes = writes if plan.writes is None else plan.writes + writes
            if requeue is not None:
                plan.queued.append(requeue)
            continue
        slot = Slot(run.id, run.position, [r.id for r in rows if r.status == InputStatus.PENDING.value],
                    ExecPolicy(run.policy), collect=run.collect,
                    model_options=ModelOptions.from_json(run.model_options))
        if status is RunStatus.WAITING:
            slot.started = True
            # What it already consumed: requeued with it should it be interrupted later.
            slot.input_ids = [r.id for r in rows if r.status == InputStatus.CONSUMED.value]
            slot.inbox = [r.id for r in rows if r.status == InputStatus.PENDING.value]
            plan.active = slot
            client_calls = client_by_run.get(run.id, [])
            plan.waiting = RunHandle(run.id, session_id, slot, status=RunStatus.WAITING,
                                     pending_approvals=set(pending_by_run.get(run.id, ())),
                                     pending_client_calls={c.call_id: ToolCall(c.call_id, c.tool, dict(c.arguments))
                                                           for c in client_calls},
                                     choice_pending=False)
            plan.client_since = min((c.created_at for c in client_calls), default=None)
        else:
            plan.queued.append(slot)
    return plan


def _restore(kernel: Kernel, runtime: SessionRuntime, plan: _Plan) -> None:
    """Synchronous: the lane as the store now has it, and its head started."""
    runtime.contents.update(plan.contents)
    for slot in plan.queued:
        kernel.register(runtime, RunHandle(slot.run_id, runtime.id, slot))
    if plan.waiting is not None:
        kernel.register(runtime, plan.waiting)
    to_start = runtime.lane.restore(plan.active, plan.queued)
    if to_start is not None:
        kernel.driver.start(runtime.handles[to_start.run_id])
    if plan.waiting is not None and plan.waiting.pending_client_calls:
        kernel.client_tools.start_timer(plan.waiting, since=plan.client_since)
    elif plan.waiting is not None and not plan.waiting.pending_approvals:
        kernel.driver.start(plan.waiting, resume=True)  # decided (or answered) just before the stop


def _interrupt(kernel: Kernel, session_id: str, run: Any, rows: list[Any]) -> tuple[Writes, Slot | None]:
    """The writes that end a cut-off run ``interrupted`` and the slot its inputs move to."""
    now = utcnow()
    # The cut-off turn's inputs are re-run by policy; steers it never took always are (invariant 6).
    input_ids = [r.id for r in rows if kernel.config.requeue_interrupted or r.status == InputStatus.PENDING.value]
    requeue = None
    if input_ids:
        requeue = Slot(new_id("run"), run.position - 0.5, input_ids, ExecPolicy(run.policy), urgent=True,
                       model_options=ModelOptions.from_json(run.model_options))

    writes = Writes(
        run_changes=[RunChange(run.id, status=RunStatus.INTERRUPTED, error=INTERRUPTED_ERROR, ended_at=now)],
        roll_backs=[run.id],
        events=[NewEvent(session_id, EventType.RUN_INTERRUPTED, run.id,
                         {"status": RunStatus.INTERRUPTED.value, "error": INTERRUPTED_ERROR})],
    )
    if requeue is not None:
        writes.runs.append(new_run(session_id, requeue, now))
        writes.input_moves.append(InputMove(input_ids, InputStatus.PENDING, requeue.run_id))
        writes.events.append(NewEvent(session_id, EventType.INPUT_REQUEUED, requeue.run_id,
                                      {"input_ids": input_ids, "from_run_id": run.id, "run_id": requeue.run_id}))
        writes.events.append(NewEvent(session_id, EventType.RUN_QUEUED, requeue.run_id, {"input_ids": input_ids}))
    return writes, requeue
