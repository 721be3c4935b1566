"""Runs: listing, cancelling, and approving their tool calls."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.api.deps import KernelDep
from corral.api.schemas import MAX_INT64, CancelIn, CancelOut, DecisionIn, RunList, RunOut
from corral.errors import NotFound
from corral.store import repo
from corral.types import RunStatus

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def run_out(row: Any) -> RunOut:
    return RunOut.model_validate(dict(row._mapping))


@router.get("")
async def list_runs(
    kernel: KernelDep,
    session_id: str | None = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
) -> RunList:
    async with kernel.store.read() as conn:
        rows = await repo.list_runs(
            conn,
            session_ids=[session_id] if session_id else None,
            statuses=[s.value for s in status] if status else None,
            limit=limit,
            offset=offset,
        )
    return RunList(runs=[run_out(row) for row in rows], limit=limit, offset=offset)


@router.get("/{run_id}")
async def get_run(run_id: str, kernel: KernelDep) -> RunOut:
    async with kernel.store.read() as conn:
        row = await repo.get_run(conn, run_id)
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    return run_out(row)


@router.post("/{run_id}/cancel", status_code=202)
async def cancel_run(run_id: str, kernel: KernelDep, body: CancelIn | None = None) -> CancelOut:
    mode = (body or CancelIn()).mode
    status = await kernel.cancel(run_id, mode)
    return CancelOut(run_id=run_id, mode=mode, status=status)


@router.post("/{run_id}/approvals/{call_id}", status_code=202)
async def decide(run_id: str, call_id: str, body: DecisionIn, kernel: KernelDep) -> dict[str, str]:
    await kernel.decide(run_id, call_id, body.decision)
    return {"run_id": run_id, "call_id": call_id, "decision": body.decision.value}
