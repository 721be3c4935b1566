"""The kernel's :class:`~corral.records.Writes` laid out as row operations.

This is the one place that knows which table a run, an input or a message lives in;
the kernel and the step loop describe what happened and never name a table.
"""

from __future__ import annotations

from typing import Any

from corral.records import NewApproval, NewClientCall, NewCompaction, NewInput, NewMessage, NewRun, Writes
from corral.store import ops
from corral.store import tables as t


def run_row(run: NewRun) -> dict[str, Any]:
    return {"id": run.id, "session_id": run.session_id, "status": "queued", "position": run.position,
            "policy": run.policy.value, "collect": run.collect, "created_at": run.created_at,
            "model_options": run.model_options}


def input_row(new: NewInput) -> dict[str, Any]:
    return {"id": new.id, "session_id": new.session_id, "run_id": new.run_id, "seq": new.seq,
            "content": new.content, "mode": new.mode, "disposition": new.disposition, "status": "pending",
            "origin": new.origin, "idempotency_key": new.idempotency_key, "created_at": new.created_at}


def message_row(message: NewMessage) -> dict[str, Any]:
    return {"session_id": message.session_id, "run_id": message.run_id, "input_id": message.input_id,
            "role": message.role, "content": message.content, "tool_calls": message.tool_calls,
            "tool_call_id": message.tool_call_id, "rolled_back": False, "created_at": message.created_at}


def approval_row(approval: NewApproval) -> dict[str, Any]:
    return {"run_id": approval.run_id, "call_id": approval.call_id, "session_id": approval.session_id,
            "tool": approval.tool, "arguments": approval.arguments, "status": "pending",
            "created_at": approval.created_at}


def client_call_row(call: NewClientCall) -> dict[str, Any]:
    return {"run_id": call.run_id, "call_id": call.call_id, "session_id": call.session_id, "tool": call.tool,
            "arguments": call.arguments, "created_at": call.created_at, "answered_at": None}


def compaction_row(compaction: NewCompaction) -> dict[str, Any]:
    return {"session_id": compaction.session_id, "run_id": compaction.run_id,
            "through_message_id": compaction.through_message_id, "summary": compaction.summary,
            "created_at": compaction.created_at}


def ops_of(writes: Writes) -> list[ops.Op]:
    """The operations of one unit; the writer merges a batch's units into few statements."""
    unit: list[ops.Op] = []
    if writes.runs:
        unit.append(ops.Insert(t.runs, [run_row(r) for r in writes.runs]))
    if writes.inputs:
        unit.append(ops.Insert(t.inputs, [input_row(i) for i in writes.inputs]))
    if writes.messages:
        unit.append(ops.Insert(t.messages, [message_row(m) for m in writes.messages]))
    if writes.approvals:
        unit.append(ops.Insert(t.approvals, [approval_row(a) for a in writes.approvals]))
    if writes.client_calls:
        unit.append(ops.Insert(t.client_calls, [client_call_row(c) for c in writes.client_calls]))
    if writes.compactions:
        unit.append(ops.Insert(t.compactions, [compaction_row(c) for c in writes.compactions]))
    for change in writes.run_changes:
        unit.append(ops.UpdateRun(change.run_id, status=change.status.value if change.status else None,
                                  output=change.output, error=change.error, usage=change.usage,
                                  started_at=change.started_at, ended_at=change.ended_at,
                                  model_options=change.model_options))
    for move in writes.input_moves:
        unit.append(ops.MoveInputs(list(move.input_ids), move.status.value, move.run_id))
    for run_id in writes.roll_backs:
        unit.append(ops.RollBack(run_id))
    for resolution in writes.resolutions:
        unit.append(ops.ResolveApproval(resolution.run_id, resolution.call_id, resolution.status.value,
                                        resolution.resolved_at))
    for result in writes.client_results:
        unit.append(ops.AnswerClientCall(result.run_id, result.call_id, result.answered_at))
    return unit
