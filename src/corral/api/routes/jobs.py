"""Scheduled jobs: a message sent to an agent on a cron expression, an interval, or once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from corral.api.deps import KernelDep, PrincipalDep, owned_session
from corral.api.json_body import CheckedRoute
from corral.errors import InvalidInput, NotFound
from corral.principals import Principal
from corral.services.scheduler import Job, Scheduler
from corral.services.schedules import Schedule
from corral.store import repo
from corral.types import Misfire, Overlap

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=CheckedRoute)


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str = "assistant"
    session_id: str | None = Field(None, description="the session to send to; default: a fresh session per fire")
    schedule: Schedule
    message: str = Field(min_length=1, max_length=200_000)
    overlap: Overlap = Overlap.SKIP
    misfire: Misfire = Misfire.RUN_ONCE


class JobOut(BaseModel):
    id: str
    owner: str
    agent: str
    session_id: str | None
    schedule: dict[str, Any]
    message: str
    overlap: Overlap
    misfire: Misfire
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_run_id: str | None
    created_at: datetime


class FireOut(BaseModel):
    fire_at: datetime
    status: str
    session_id: str | None
    run_id: str | None


def scheduler_of(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


def job_out(job: Job) -> JobOut:
    return JobOut(**job.row())


def owned_job(scheduler: Scheduler, principal: Principal, job_id: str) -> Job:
    job = scheduler.get(job_id)
    if not principal.may_access(job.owner):
        raise NotFound(f"no job {job_id!r}")
    return job


@router.post("", status_code=201)
async def create_job(body: JobIn, request: Request, kernel: KernelDep, principal: PrincipalDep) -> JobOut:
    kernel.agents.get(body.agent)  # 404 for an unknown agent, before anything is stored
    if body.session_id is not None:
        session = await owned_session(kernel, principal, body.session_id)
        if session.agent != body.agent:
            raise InvalidInput(f"session {body.session_id} belongs to agent {session.agent!r}, not {body.agent!r}")
    job = await scheduler_of(request).add(principal.name, body.agent, body.schedule, body.message,
                                          session_id=body.session_id, overlap=body.overlap, misfire=body.misfire)
    return job_out(job)


@router.get("")
async def list_jobs(request: Request, principal: PrincipalDep) -> list[JobOut]:
    return [job_out(job) for job in scheduler_of(request).list() if principal.may_access(job.owner)]


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request, principal: PrincipalDep) -> JobOut:
    return job_out(owned_job(scheduler_of(request), principal, job_id))


@router.get("/{job_id}/fires")
async def list_fires(job_id: str, request: Request, kernel: KernelDep, principal: PrincipalDep) -> list[FireOut]:
    owned_job(scheduler_of(request), principal, job_id)
    rows = await kernel.store.read(repo.job_fires, job_id)
    return [FireOut(fire_at=r.fire_at, status=r.status, session_id=r.session_id, run_id=r.run_id) for r in rows]


@router.delete("/{job_id}", status_code=204)
async def delete_job(job_id: str, request: Request, principal: PrincipalDep) -> Response:
    scheduler = scheduler_of(request)
    owned_job(scheduler, principal, job_id)
    await scheduler.remove(job_id)
    return Response(status_code=204)
