"""Run states, the one table of allowed transitions, and a run's in-memory handle."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from corral.errors import InvalidTransition
from corral.kernel.lane import Slot
from corral.records import NewRun
from corral.types import ApprovalStatus, CancelMode, RunStatus

if TYPE_CHECKING:
    from corral.providers.base import ToolCall

S = RunStatus
ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.INTERRUPTED}),
    S.RUNNING: frozenset({S.WAITING, S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED}),
    S.WAITING: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.INTERRUPTED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.INTERRUPTED: frozenset(),
}


def check_transition(run_id: str, current: RunStatus, target: RunStatus) -> None:
    if target not in ALLOWED[current]:
        raise InvalidTransition(f"run {run_id}: {current.value} -> {target.value} is not allowed")


@dataclass(frozen=True)
class RunEnd:
    """What a run-end listener learns, after the run's end is committed."""

    session_id: str
    run_id: str
    status: RunStatus
    output: str | None
    error: dict[str, Any] | None
    # Its inputs went on in a new run (an interrupted run, re-queued): the work is not over.
    continued: bool
    # The session's completed runs, this one included (0 when not known: an end read back
    # from the store rather than seen happening).
    completed_runs: int = 0


class CancelReason:
    USER = "cancelled by request"
    INTERRUPTED = "interrupted by a newer message"
    SHUTDOWN = "the server is shutting down"
    CLIENT_TIMEOUT = "the client sent no result of its tool calls in time"
    CLIENT_MOVED_ON = "the client sent a new message without the results of its tool calls"


@dataclass(eq=False)
class RunHandle:
    """The kernel's view of one unfinished run. Only the kernel mutates it."""

    run_id: str
    session_id: str
    slot: Slot
    status: RunStatus = RunStatus.QUEUED
    # Resolves once the run's accepting write committed: nothing runs before that.
    accepted: asyncio.Future[object] | None = None
    # The run's prompt, when it began in its accepting write (``Intake.starts_at_once``).
    prompt: list[str] | None = None
    # Its move to ``running`` as the store has it: resolves once committed (after repairs, if
    # its write failed), to True; to False if the store refused it for good (the run fails).
    begun: asyncio.Future[bool] | None = None
    task: asyncio.Task[None] | None = None
    cancel_mode: CancelMode | None = None
    cancel_reason: str | None = None
    roll_back: bool = False
    hard_timer: asyncio.TimerHandle | None = None
    # Started by a background origin (the scheduler): yields model slots to interactive runs.
    background: bool = False
    # When the run was accepted (monotonic clock): its wait in the lane is measured from here.
    queued_at: float = field(default_factory=time.monotonic)
    # Approvals this run waits for (call ids), while parked in `waiting`.
    pending_approvals: set[str] = field(default_factory=set)
    # Calls of the client's own tools whose results this run waits for, by call id, while parked
    # in `waiting` (``kernel/client_tools.py``); the run resumes when this and
    # ``pending_approvals`` are both empty. ``client_timer`` ends the wait if no result comes.
    pending_client_calls: dict[str, ToolCall] = field(default_factory=dict)
    client_timer: asyncio.TimerHandle | None = None
    # Whether a forcing ``tool_choice`` of the run's model options (``required``, a function)
    # still binds its next model call: it binds the first call after the request that brought
    # it (a new input, or the client's results), so a forced tool cannot loop within a run.
    choice_pending: bool = True
    # Decisions awaited by a run that stays alive while a human decides (an ACP agent's
    # permission request), by call id; ``decide`` resolves them.
    approval_waiters: dict[str, asyncio.Future[ApprovalStatus]] = field(default_factory=dict)
    # Set at the first cancel request, for a driver that must act on it at once rather
    # than at its next step boundary (an ACP agent is told with ``session/cancel``).
    cancel_signal: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the run has ended in memory; ``recorded`` once that end is committed (after
    # repairs, if its write failed; or given up at shutdown, left to start-up recovery).
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    recorded: asyncio.Event = field(default_factory=asyncio.Event)

    def __repr__(self) -> str:
        cancel = f" cancel={self.cancel_mode.value}" if self.cancel_mode else ""
        return f"<Run {self.run_id} {self.status.value}{cancel}>"

    def move(self, target: RunStatus) -> None:
        check_transition(self.run_id, self.status, target)
        self.status = target

    def request_cancel(self, mode: CancelMode) -> None:
        """Record a cancel request: a hard one overrides a soft one, never the reverse."""
        if mode is CancelMode.HARD or self.cancel_mode is None:
            self.cancel_mode = mode
        self.cancel_signal.set()

    @property
    def soft_cancel_requested(self) -> bool:
        return self.cancel_mode is not None

    @property
    def interrupted_by_shutdown(self) -> bool:
        return self.cancel_reason == CancelReason.SHUTDOWN


def new_run(session_id: str, slot: Slot, now: datetime) -> NewRun:
    """The record of a run that has just been queued for ``slot``."""
    options = slot.model_options.as_json() if slot.model_options is not None else None
    return NewRun(slot.run_id, session_id, slot.position, slot.policy, slot.collect, now, options)
