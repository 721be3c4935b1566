"""What the kernel and the step loop ask the store to record, as plain data.

The kernel decides; the store writes. Between them passes a :class:`Writes`: the rows a
transition creates, the columns it changes and the events it appends, to be committed
in one transaction (all or nothing). It names no table and imports no SQL, so the
kernel stays testable without a database and the store is the only module that knows
how a run is laid out in rows (``corral.store.plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.clock import utcnow
from corral.events import NewEvent
from corral.types import ApprovalStatus, ExecPolicy, InputStatus, RunStatus


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run that has just been queued."""

    id: str
    session_id: str
    position: float
    policy: ExecPolicy
    collect: bool
    created_at: datetime
    # What the client's request adds to the run's model calls (``ModelOptions.as_json``), or None.
    model_options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewInput:
    """An accepted input, and the run that will carry it."""

    id: str
    session_id: str
    run_id: str
    seq: int
    content: str
    mode: str
    disposition: str
    origin: str
    idempotency_key: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One message of a conversation; ``run_id`` is empty for history no run produced."""

    session_id: str
    run_id: str
    role: str
    content: str
    input_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True)
class NewApproval:
    """A question to a human about one tool call of a run."""

    run_id: str
    call_id: str
    session_id: str
    tool: str
    arguments: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewClientCall:
    """A call of one of the client's own tools: the run waits until the client sends its result."""

    run_id: str
    call_id: str
    session_id: str
    tool: str
    arguments: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClientResult:
    """The client sent the result of one of its calls (the result itself is a tool message)."""

    run_id: str
    call_id: str
    answered_at: datetime


@dataclass(frozen=True, slots=True)
class RunChange:
    """Set some of a run's columns; ``None`` leaves a column as it is."""

    run_id: str
    status: RunStatus | None = None
    output: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, int] | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    model_options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class InputMove:
    """Give inputs a status and, optionally, a new run to carry them."""

    input_ids: Sequence[str]
    status: InputStatus
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """A human's decision on one pending approval."""

    run_id: str
    call_id: str
    status: ApprovalStatus
    resolved_at: datetime


@dataclass(frozen=True, slots=True)
class NewCompaction:
    """The summary that now stands for a conversation's messages up to ``through_message_id``."""

    session_id: str
    run_id: str
    through_message_id: int
    summary: str
    created_at: datetime


@dataclass(slots=True)
class Writes:
    """Everything one transition records, committed in one transaction, events included.

    The kinds are applied in a fixed order (the store's plan): new rows first, then run
    changes, input moves, roll-backs and resolutions, so a unit that ends a run and
    queues its follow-up is consistent whatever the batch it lands in.
    """

    runs: list[NewRun] = field(default_factory=list)
    inputs: list[NewInput] = field(default_factory=list)
    messages: list[NewMessage] = field(default_factory=list)
    approvals: list[NewApproval] = field(default_factory=list)
    compactions: list[NewCompaction] = field(default_factory=list)
    run_changes: list[RunChange] = field(default_factory=list)
    input_moves: list[InputMove] = field(default_factory=list)
    # Runs whose messages are kept for audit but left out of the model's context.
    roll_backs: list[str] = field(default_factory=list)
    resolutions: list[Resolution] = field(default_factory=list)
    events: list[NewEvent] = field(default_factory=list)
    client_calls: list[NewClientCall] = field(default_factory=list)
    client_results: list[ClientResult] = field(default_factory=list)

    def __add__(self, other: Writes) -> Writes:
        return Writes(
            self.runs + other.runs, self.inputs + other.inputs, self.messages + other.messages,
            self.approvals + other.approvals, self.compactions + other.compactions,
            self.run_changes + other.run_changes, self.input_moves + other.input_moves,
            self.roll_backs + other.roll_backs, self.resolutions + other.resolutions, self.events + other.events,
            self.client_calls + other.client_calls, self.client_results + other.client_results,
        )
