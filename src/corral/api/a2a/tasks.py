"""A task is a run: what an A2A client sees of a Corral run, read from the store.

The state follows the run's status, with one refinement: a run parked on approvals it still
waits for is ``input-required`` (a run waiting on its subagents is still ``working``). The
task's history is the run's own conversation (the user's input, then what the agent said);
its one artifact, ``output``, is the run's final text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from a2a.types.a2a_pb2 import Artifact, Message, Part, Role, Task, TaskState, TaskStatus
from google.protobuf.json_format import ParseDict
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection, Row

from corral.store import repo, tables
from corral.types import ApprovalStatus, RunStatus

# The id of the one artifact a task has: the run's final text (streamed as it is written).
OUTPUT = "output"

_STATES = {
    RunStatus.QUEUED: TaskState.TASK_STATE_SUBMITTED,
    RunStatus.RUNNING: TaskState.TASK_STATE_WORKING,
    RunStatus.WAITING: TaskState.TASK_STATE_WORKING,
    RunStatus.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    RunStatus.FAILED: TaskState.TASK_STATE_FAILED,
    RunStatus.CANCELLED: TaskState.TASK_STATE_CANCELED,
    # Stopped by a shutdown or a crash; its input goes on in a new task of the same context.
    RunStatus.INTERRUPTED: TaskState.TASK_STATE_FAILED,
}


@dataclass(frozen=True)
class Pending:
    """A tool call the run waits for a decision on."""

    call_id: str
    tool: str
    arguments: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "tool": self.tool, "arguments": self.arguments}


@dataclass(frozen=True)
class TaskRecord:
    """A run as its task: the run, its session, its conversation and open questions, and the
    session's last event seq when they were read (a stream sends what comes after it)."""

    run: Row[Any]
    agent: str
    owner: str
    inputs: Sequence[Row[Any]]
    messages: Sequence[Row[Any]]
    pending: list[Pending]
    last_seq: int

    @property
    def run_id(self) -> str:
        return str(self.run.id)

    @property
    def session_id(self) -> str:
        return str(self.run.session_id)

    @property
    def status(self) -> RunStatus:
        return RunStatus(self.run.status)


def read_record(conn: Connection, run_id: str) -> TaskRecord | None:
    """One read for everything a task shows (a ``store.read`` function)."""
    first = repo.get_run(conn, run_id)
    if first is None:
        return None
    session = repo.get_session(conn, first.session_id)
    if session is None:
        return None
    last_seq = repo.last_event_seqs(conn, [first.session_id]).get(first.session_id, 0)
    # Read again after the seq: on Postgres each statement sees the latest commit, and the
    # snapshot must be at least as new as the seq a stream resumes from.
    run = repo.get_run(conn, run_id)
    assert run is not None
    return TaskRecord(run, session.agent, session.owner, repo.inputs_of_runs(conn, [run_id]),
                      _run_messages(conn, run_id), read_pending(conn, run_id), last_seq)


def _run_messages(conn: Connection, run_id: str) -> Sequence[Row[Any]]:
    """One run's messages in order (by ``ix_messages_run_id``)."""
    query = sa.select(tables.messages).where(tables.messages.c.run_id == run_id).order_by(tables.messages.c.id)
    return conn.execute(query).all()


def read_pending(conn: Connection, run_id: str) -> list[Pending]:
    """The run's approvals still waiting for a decision."""
    return [Pending(a.call_id, a.tool, dict(a.arguments)) for a in repo.approvals_of_run(conn, run_id)
            if a.status == ApprovalStatus.PENDING.value]


def task_state(status: RunStatus, pending: Sequence[Pending]) -> TaskState:
    if pending and not status.is_terminal:
        return TaskState.TASK_STATE_INPUT_REQUIRED
    return _STATES[status]


def task_status(task_id: str, context_id: str, status: RunStatus, *, pending: Sequence[Pending] = (),
                error: dict[str, Any] | None = None, at: datetime | None = None) -> TaskStatus:
    """The task's status, with the agent's message where there is something to say: the
    question of an ``input-required`` task, or why it failed or was cancelled."""
    state = task_state(status, pending)
    out = TaskStatus(state=state)
    text = _status_text(status, pending, error)
    if text is not None:
        parts = [Part(text=text)]
        if state == TaskState.TASK_STATE_INPUT_REQUIRED:
            parts.append(data_part({"approvals": [p.as_json() for p in pending]}))
        out.message.CopyFrom(agent_message(f"{task_id}-status", task_id, context_id, parts))
    if at is not None:
        out.timestamp.CopyFrom(_timestamp(at))
    return out


def _status_text(status: RunStatus, pending: Sequence[Pending], error: dict[str, Any] | None) -> str | None:
    if pending and not status.is_terminal:
        asks = "; ".join(f"{p.tool} {json.dumps(p.arguments)} (call {p.call_id})" for p in pending)
        return (f"Approval needed: {asks}. Answer with a message on this task: 'approve' or 'deny', "
                'or a data part {"decision": "approve" | "deny", "call_id": "..."}.')
    message = (error or {}).get("message")
    if status is RunStatus.INTERRUPTED:
        return "interrupted: the service stopped while the task ran; its input goes on as a new task of this context"
    if status in (RunStatus.FAILED, RunStatus.CANCELLED):
        return str(message) if message else status.value
    return None


def task_of(record: TaskRecord) -> Task:
    run = record.run
    status = task_status(record.run_id, record.session_id, record.status, pending=record.pending, error=run.error,
                         at=run.ended_at or run.started_at or run.created_at)
    task = Task(id=record.run_id, context_id=record.session_id, status=status, history=_history(record),
                metadata=_struct({"corral_status": run.status}))
    if run.output:
        task.artifacts.append(output_artifact(run.output))
    return task


def _history(record: TaskRecord) -> list[Message]:
    """The run's conversation: its stored messages once it began, its inputs before."""
    task_id, context_id = record.run_id, record.session_id
    if not record.messages:
        return [_message(i.id, task_id, context_id, Role.ROLE_USER, i.content) for i in record.inputs]
    history = []
    for m in record.messages:
        if m.role == "user":
            history.append(_message(m.input_id or f"{task_id}-m{m.id}", task_id, context_id, Role.ROLE_USER,
                                    m.content))
        elif m.role == "assistant" and m.content:
            history.append(_message(f"{task_id}-m{m.id}", task_id, context_id, Role.ROLE_AGENT, m.content))
    return history


def output_artifact(text: str) -> Artifact:
    return Artifact(artifact_id=OUTPUT, name=OUTPUT, parts=[Part(text=text)])


def agent_message(message_id: str, task_id: str, context_id: str, parts: list[Part]) -> Message:
    return Message(message_id=message_id, task_id=task_id, context_id=context_id, role=Role.ROLE_AGENT, parts=parts)


def _message(message_id: str, task_id: str, context_id: str, role: Role, text: str) -> Message:
    return Message(message_id=message_id, task_id=task_id, context_id=context_id, role=role, parts=[Part(text=text)])


def data_part(data: dict[str, Any]) -> Part:
    return Part(data=ParseDict(data, Value()), media_type="application/json")


def _struct(data: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(data)
    return out


def _timestamp(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out
