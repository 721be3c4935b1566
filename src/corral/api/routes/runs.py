"""Runs: listing, cancelling, and approving their tool calls."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.api.deps import KernelDep, PrincipalDep, owned_run
from corral.api.json_body import CheckedRoute
from corral.api.schemas import MAX_INT64, CancelIn, CancelOut, DecisionIn, PendingApproval, RunList, RunOut
from corral.store import repo
from corral.types import ApprovalStatus, RunStatus

router = APIRouter(prefix="/v1/runs", tags=["runs"], route_class=CheckedRoute)


def run_out(row: Any) -> RunOut:
    return RunOut.model_validate(dict(row._mapping))


@router.get("")
async def list_runs(
    kernel: KernelDep,
    principal: PrincipalDep,
    session_id: str | None = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
) -> RunList:
    rows = await kernel.store.read(
        repo.list_runs,
        session_ids=[session_id] if session_id else None,
        statuses=[s.value for s in status] if status else None,
        limit=limit,
        offset=offset,
        owner=None if principal.admin else principal.name,
    )
    return RunList(runs=[run_out(row) for row in rows], limit=limit, offset=offset)


@router.get("/{run_id}")
async def get_run(run_id: str, kernel: KernelDep, principal: PrincipalDep) -> RunOut:
    row = await owned_run(kernel, principal, run_id)
    out = run_out(row)
    if out.status is RunStatus.WAITING:
        approvals = await kernel.store.read(repo.approvals_of_run, run_id)
        out.pending_approvals = [PendingApproval(call_id=a.call_id, tool=a.tool, arguments=a.arguments)
                                 for a in approvals if a.status == ApprovalStatus.PENDING.value]
        calls = await kernel.store.unanswered_client_calls([run_id])
        out.pending_client_calls = [PendingApproval(call_id=c.call_id, tool=c.tool, arguments=c.arguments)
                                    for c in calls]
    return out


@router.post("/{run_id}/cancel", status_code=202)
async def cancel_run(
    run_id: str, kernel: KernelDep, principal: PrincipalDep, body: CancelIn | None = None
) -> CancelOut:
    await owned_run(kernel, principal, run_id)
    mode = (body or CancelIn()).mode
    status = await kernel.cancel(run_id, mode)
    return CancelOut(run_id=run_id, mode=mode, status=status)


@router.post("/{run_id}/approvals/{call_id}", status_code=202)
async def decide(
    run_id: str, call_id: str, body: DecisionIn, kernel: KernelDep, principal: PrincipalDep
) -> dict[str, str]:
    await owned_run(kernel, principal, run_id)
    await kernel.decide(run_id, call_id, body.decision)
    return {"run_id": run_id, "call_id": call_id, "decision": body.decision.value}
