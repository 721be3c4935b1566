"""Write operations as data, so the writer can merge a whole batch into a few statements.

A batch of hundreds of units would cost hundreds of round trips to the database if each
unit ran its own statements; described as data, the batch becomes one ``executemany``
per kind of operation. The writer applies the kinds in a fixed order that respects
foreign keys and the one-active-run index:

1. inserts, table by table in dependency order (rows in submission order);
2. run updates, merged per run (later values win) and applied in order of each run's
   first appearance, so a run that ends is always updated before the next run of its
   session starts;
3. input moves, message roll-backs, approval resolutions, client calls answered;
4. free-form functions (``Call``), in submission order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.store import tables as t

# Runs on the writer's thread (SQLite) or greenlet (Postgres), inside the batch's transaction.
WriteFn = Callable[[Connection], Any]


@dataclass(frozen=True, slots=True)
class Insert:
    table: sa.Table
    rows: Sequence[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class UpdateRun:
    """Set some of a run's columns; ``None`` values are left unchanged."""

    run_id: str
    status: str | None = None
    output: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    model_options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MoveInputs:
    """Give inputs a status and, optionally, a new run."""

    input_ids: Sequence[str]
    status: str
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class RollBack:
    """Keep a run's messages for audit but leave them out of the model's context."""

    run_id: str


@dataclass(frozen=True, slots=True)
class ResolveApproval:
    run_id: str
    call_id: str
    status: str
    resolved_at: datetime


@dataclass(frozen=True, slots=True)
class AnswerClientCall:
    run_id: str
    call_id: str
    answered_at: datetime


@dataclass(frozen=True, slots=True)
class Call:
    """Anything else: a function of the connection, run after the batch's other operations."""

    fn: WriteFn


Op = Insert | UpdateRun | MoveInputs | RollBack | ResolveApproval | AnswerClientCall | Call

INSERT_ORDER = (t.agents, t.sessions, t.runs, t.inputs, t.messages, t.approvals, t.client_calls, t.compactions,
                t.jobs, t.job_fires, t.subagents)
_INSERTABLE = frozenset(table.name for table in INSERT_ORDER)
RUN_COLUMNS = ("status", "output", "error", "usage", "started_at", "ended_at", "model_options")


def _keep(column: str) -> Any:
    return sa.func.coalesce(sa.bindparam(f"v_{column}", type_=t.runs.c[column].type), t.runs.c[column])


UPDATE_RUNS = (
    t.runs.update()
    .where(t.runs.c.id == sa.bindparam("k_id"))
    .values({column: _keep(column) for column in RUN_COLUMNS})
)
MOVE_INPUTS = (
    t.inputs.update()
    .where(t.inputs.c.id == sa.bindparam("k_id"))
    .values(status=sa.bindparam("v_status"), run_id=sa.func.coalesce(sa.bindparam("v_run"), t.inputs.c.run_id))
)
ROLL_BACK = t.messages.update().where(t.messages.c.run_id == sa.bindparam("k_run")).values(rolled_back=True)
RESOLVE = (
    t.approvals.update()
    .where(t.approvals.c.run_id == sa.bindparam("k_run"), t.approvals.c.call_id == sa.bindparam("k_call"))
    .values(status=sa.bindparam("v_status"), resolved_at=sa.bindparam("v_at", type_=t.approvals.c.resolved_at.type))
)
ANSWER = (
    t.client_calls.update()
    .where(t.client_calls.c.run_id == sa.bindparam("k_run"), t.client_calls.c.call_id == sa.bindparam("k_call"))
    .values(answered_at=sa.bindparam("v_at", type_=t.client_calls.c.answered_at.type))
)


@dataclass
class _Plan:
    inserts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    roll_backs: list[str] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    calls: list[WriteFn] = field(default_factory=list)

    def add(self, op: Op) -> None:
        if isinstance(op, Insert):
            if op.table.name not in _INSERTABLE:  # a table missing from INSERT_ORDER would be dropped silently
                raise ValueError(f"ops.Insert into {op.table.name!r}: add the table to INSERT_ORDER")
            self.inserts.setdefault(op.table.name, []).extend(op.rows)
        elif isinstance(op, UpdateRun):
            merged = self.runs.setdefault(op.run_id, {})
            for column in RUN_COLUMNS:
                value = getattr(op, column)
                if value is not None:
                    merged[column] = value
        elif isinstance(op, MoveInputs):
            for input_id in op.input_ids:
                merged = self.inputs.setdefault(input_id, {"v_run": None})
                merged["v_status"] = op.status
                if op.run_id is not None:
                    merged["v_run"] = op.run_id
        elif isinstance(op, RollBack):
            self.roll_backs.append(op.run_id)
        elif isinstance(op, ResolveApproval):
            self.approvals.append(
                {"k_run": op.run_id, "k_call": op.call_id, "v_status": op.status, "v_at": op.resolved_at}
            )
        elif isinstance(op, AnswerClientCall):
            self.answers.append({"k_run": op.run_id, "k_call": op.call_id, "v_at": op.answered_at})
        else:
            self.calls.append(op.fn)


# A message's id is the database's: the insert hands the ids back, in the rows' order.
INSERT_MESSAGES = t.messages.insert().returning(t.messages.c.id, sort_by_parameter_order=True)


def apply(conn: Connection, ops: Sequence[Op]) -> list[dict[str, Any]]:
    """Apply a batch's operations with one statement per kind (see the module docstring);
    returns the messages inserted, each row with its ``id``."""
    plan = _Plan()
    for op in ops:
        plan.add(op)
    messages: list[dict[str, Any]] = []
    for table in INSERT_ORDER:
        rows = plan.inserts.get(table.name)
        if not rows:
            continue
        if table is t.messages:
            ids = conn.execute(INSERT_MESSAGES, rows).scalars().all()
            messages = [{**row, "id": message_id} for row, message_id in zip(rows, ids, strict=True)]
        else:
            conn.execute(table.insert(), rows)
    if plan.runs:
        params = [
            {"k_id": run_id, **{f"v_{c}": values.get(c) for c in RUN_COLUMNS}} for run_id, values in plan.runs.items()
        ]
        conn.execute(UPDATE_RUNS, params)
    if plan.inputs:
        conn.execute(MOVE_INPUTS, [{"k_id": input_id, **v} for input_id, v in plan.inputs.items()])
    if plan.roll_backs:
        conn.execute(ROLL_BACK, [{"k_run": run_id} for run_id in plan.roll_backs])
    if plan.approvals:
        conn.execute(RESOLVE, plan.approvals)
    if plan.answers:
        conn.execute(ANSWER, plan.answers)
    for fn in plan.calls:
        fn(conn)
    return messages
