"""Names shared by every layer: identifiers, states and modes.

Enums rather than flags or bare strings, so a typo is a type error and every state
a thing can be in is listed in one place.
"""

from __future__ import annotations

import secrets
from enum import StrEnum

SessionId = str
RunId = str
InputId = str
CallId = str
AgentName = str


def new_id(prefix: str) -> str:
    """A random, URL-safe identifier with a readable prefix (``run_3f9a...``)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """Active runs occupy their session: the database allows one at a time."""
        return self in ACTIVE_STATUSES


TERMINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED}
)
ACTIVE_STATUSES = frozenset({RunStatus.RUNNING, RunStatus.WAITING})


class Mode(StrEnum):
    """What a message does when its session is busy (DESIGN.md section 1)."""

    QUEUE = "queue"
    COLLECT = "collect"
    STEER = "steer"
    INTERRUPT = "interrupt"
    ROLLBACK = "rollback"
    REJECT = "reject"


class Disposition(StrEnum):
    STARTED = "started"
    QUEUED = "queued"
    STEERED = "steered"
    COLLECTED = "collected"


class InputStatus(StrEnum):
    PENDING = "pending"
    CONSUMED = "consumed"
    CANCELLED = "cancelled"


class ExecPolicy(StrEnum):
    """Per run: ``continue`` stops only for tools marked ``ask``; ``pause`` asks for every call."""

    CONTINUE = "continue"
    PAUSE = "pause"


class Overlap(StrEnum):
    """What a scheduled job does when it is due while its previous fire's run is still active."""

    SKIP = "skip"
    QUEUE = "queue"


class Misfire(StrEnum):
    """What a scheduled job does about fires it missed while the service was down."""

    RUN_ONCE = "run_once"
    SKIP = "skip"


class Approval(StrEnum):
    """Per agent and tool: run it, ask a human first, or refuse it."""

    AUTO = "auto"
    ASK = "ask"
    DENY = "deny"


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


class CancelMode(StrEnum):
    SOFT = "soft"
    HARD = "hard"


class AgentState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"


class EventType(StrEnum):
    RUN_QUEUED = "run.queued"
    RUN_STARTED = "run.started"
    MESSAGE_DELTA = "message.delta"
    MESSAGE_COMPLETED = "message.completed"
    TOOL_STARTED = "tool.started"
    TOOL_COMPLETED = "tool.completed"
    RUN_STEERED = "run.steered"
    INPUT_REQUEUED = "input.requeued"
    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_RESOLVED = "approval.resolved"
    RUN_WAITING = "run.waiting"
    CONTEXT_COMPACTED = "context.compacted"
    SUBAGENT_SPAWNED = "subagent.spawned"
    SUBAGENT_COMPLETED = "subagent.completed"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    RUN_INTERRUPTED = "run.interrupted"


TERMINAL_EVENT = {
    RunStatus.COMPLETED: EventType.RUN_COMPLETED,
    RunStatus.FAILED: EventType.RUN_FAILED,
    RunStatus.CANCELLED: EventType.RUN_CANCELLED,
    RunStatus.INTERRUPTED: EventType.RUN_INTERRUPTED,
}
TERMINAL_EVENT_TYPES = frozenset(TERMINAL_EVENT.values())
