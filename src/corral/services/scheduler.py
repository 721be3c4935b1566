"""The scheduler: jobs that wake agents on a cron expression, an interval, or at a moment.

One loop sleeps until the earliest due job and wakes at once when a job is added or removed
(an event, not a polling interval); stopping it is cancelling its task. It reads the time and
sleeps through one ``Clock``: the system's in service, a hand-driven one in tests, which moves
time on and wakes the loop at once instead of making a test wait for real. A fire enqueues an
input with origin ``scheduler`` (a background-class run) under the idempotency key
``job:<id>:<due time>``, then records the fire and the job's next due time in one write. A
crash between the two repeats the same enqueue after the restart, which the key turns into
a no-op: a fire is never lost and never doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy.exc import IntegrityError

from corral.clock import utcnow
from corral.errors import CorralError, InvalidInput, NotFound, ShuttingDown, ToolError
from corral.kernel import Kernel
from corral.principals import LOCAL
from corral.services.schedules import AnySchedule, Schedule, next_fire
from corral.store import ops, repo
from corral.store import tables as t
from corral.tools.base import Tool, ToolContext
from corral.types import Misfire, Overlap, new_id

log = logging.getLogger(__name__)

SCHEDULE = TypeAdapter(Schedule)
# The longest the system clock sleeps in one go: a wall-clock jump is noticed within this.
MAX_SLEEP_S = 300.0


class Clock(Protocol):
    """The scheduler's time: what time it is, and a sleep until a time that a change cuts short."""

    def now(self) -> datetime: ...

    async def sleep_until(self, deadline: datetime | None, wake: asyncio.Event) -> None:
        """Return once ``deadline`` has come (``None``: no deadline) or ``wake`` is set; at once
        if either is so already. It may return early (the caller looks at the time again), and
        cancelling it ends it at once."""
        ...


class SystemClock:
    """Wall-clock time (UTC), and a sleep on the event loop's timer."""

    def now(self) -> datetime:
        return utcnow()

    async def sleep_until(self, deadline: datetime | None, wake: asyncio.Event) -> None:
        delay = MAX_SLEEP_S if deadline is None else min((deadline - self.now()).total_seconds(), MAX_SLEEP_S)
        if delay <= 0 or wake.is_set():
            return
        # Not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the event is set.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    agent: str
    session_id: str | None
    schedule: AnySchedule
    message: str
    overlap: Overlap
    misfire: Misfire
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_run_id: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(row.id, row.owner, row.agent, row.session_id, SCHEDULE.validate_python(row.schedule),
                   row.message, Overlap(row.overlap), Misfire(row.misfire), row.next_fire_at, row.last_fire_at,
                   row.last_run_id, row.created_at)

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "agent": self.agent, "session_id": self.session_id,
                "schedule": self.schedule.model_dump(mode="json"), "message": self.message,
                "overlap": self.overlap.value, "misfire": self.misfire.value, "next_fire_at": self.next_fire_at,
                "last_fire_at": self.last_fire_at, "last_run_id": self.last_run_id, "created_at": self.created_at}


class Scheduler:
    def __init__(self, kernel: Kernel, *, misfire_grace_s: float = 60.0, clock: Clock = SYSTEM_CLOCK):
        self.kernel = kernel
        self.misfire_grace_s = misfire_grace_s
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._changed = asyncio.Event()
        # Reads of the jobs table under way, and what ``add``/``remove`` did meanwhile (the job,
        # or None once removed): a read may predate those writes, so they are applied again on it.
        self._loading = 0
        self._meanwhile: dict[str, Job | None] = {}
        # Counts every due time handled (fired, skipped, missed or failed); see wait_handled.
        self.handled = 0
        self.fires = 0
        self._progress = asyncio.Condition()

    def __repr__(self) -> str:
        due = min((j.next_fire_at for j in self._jobs.values() if j.next_fire_at), default=None)
        return f"<Scheduler jobs={len(self._jobs)} fires={self.fires} next={due.isoformat() if due else None}>"

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Load the jobs, then fire each when due, until cancelled."""
        await self._load()
        while not self.kernel.stopping.is_set():
            self._changed.clear()  # before looking: a change made while firing wakes the next wait
            now = self.clock.now()
            for job in sorted(self._due(now), key=lambda j: j.next_fire_at or now):
                try:
                    await self._fire_due(job, now)
                except ShuttingDown:
                    return  # the fire stays due in the store: the next start makes it
            await self.clock.sleep_until(self._next_due(), self._changed)

    async def reload(self) -> None:
        """Take the jobs as the store has them (a cluster: jobs created or deleted on another node,
        and those a dead node fired, fire here too; a due time every node fires is still one
        input and one fire row, by its Idempotency-Key and the fire row's key)."""
        await self._load()
        self._changed.set()

    async def _load(self) -> None:
        """The jobs as the store has them, with this process's own adds and removes made while
        the read ran applied on top: a job added as the service started was lost otherwise,
        and never fired."""
        self._loading += 1
        try:
            rows = await self.kernel.store.read(repo.all_jobs)
        finally:
            self._loading -= 1
        jobs = {row.id: Job.from_row(row) for row in rows}
        for job_id, job in self._meanwhile.items():
            if job is None:
                jobs.pop(job_id, None)
            else:
                jobs[job_id] = job
        if not self._loading:
            self._meanwhile.clear()
        self._jobs = jobs

    async def reload_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.reload()

    def _due(self, now: datetime) -> list[Job]:
        return [job for job in self._jobs.values() if job.next_fire_at is not None and job.next_fire_at <= now]

    def _next_due(self) -> datetime | None:
        return min((job.next_fire_at for job in self._jobs.values() if job.next_fire_at is not None), default=None)

    async def _fire_due(self, job: Job, now: datetime) -> None:
        due = job.next_fire_at
        assert due is not None
        missed = (now - due).total_seconds() > self.misfire_grace_s
        # After a missed fire the schedule resumes from now; otherwise from the fire itself.
        following = next_fire(job.schedule, now if missed else due, job.created_at)
        if missed and job.misfire is Misfire.SKIP:
            await self._record(job, due, following, "missed", None, None)
        elif job.overlap is Overlap.SKIP and self._still_active(job.last_run_id):
            await self._record(job, due, following, "skipped", None, None)
        else:
            try:
                session_id, run_id = await self._enqueue(job, due)
            except ShuttingDown:
                raise
            except CorralError as exc:
                log.warning("job %s could not fire: %s", job.id, exc)
                await self._record(job, due, following, "failed", None, None)
                return
            self.fires += 1
            self.kernel.metrics.scheduler_lag.observe(max(0.0, (self.clock.now() - due).total_seconds()))
            await self._record(job, due, following, "fired", session_id, run_id)

    def _still_active(self, run_id: str | None) -> bool:
        return run_id is not None and self.kernel.run_handle(run_id) is not None

    async def _enqueue(self, job: Job, due: datetime) -> tuple[str, str]:
        key = f"job:{job.id}:{due.isoformat()}"
        session_id = job.session_id
        if session_id is None:  # a fresh session per fire, itself keyed by the fire
            row, _ = await self.kernel.sessions.create(job.agent, key, {"job_id": job.id}, owner=job.owner)
            session_id = row["id"]
        # Every node's scheduler may fire it: the key makes it one input, at the session's owner.
        accepted = await self.kernel.submit_anywhere(session_id, job.message, origin="scheduler", idempotency_key=key)
        return session_id, accepted.run_id

    async def _record(self, job: Job, due: datetime, following: datetime | None, status: str,
                      session_id: str | None, run_id: str | None) -> None:
        fired = status == "fired"
        values: dict[str, Any] = {"next_fire_at": following}
        if fired:
            values.update(last_fire_at=due, last_run_id=run_id)
        fire = {"job_id": job.id, "fire_at": due, "status": status, "session_id": session_id, "run_id": run_id,
                "created_at": utcnow()}
        try:
            await self.kernel.store.write([
                ops.Insert(t.job_fires, [fire]),
                ops.Call(lambda conn: repo.advance_job(conn, job.id, **values)),
            ])
        except IntegrityError:  # another node sharing the database recorded this fire first
            row = await self.kernel.store.read(repo.get_job, job.id)
            if row is None:
                self._jobs.pop(job.id, None)
            else:
                self._jobs[job.id] = Job.from_row(row)
            return
        if job.id in self._jobs:  # it may have been deleted meanwhile
            self._jobs[job.id] = replace(job, **values) if fired else replace(job, next_fire_at=following)
        async with self._progress:
            self.handled += 1
            self._progress.notify_all()

    async def wait_handled(self, count: int) -> None:
        """Until ``count`` due times have been handled since start (for tests and tools that wait)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.handled >= count)

    # --- changes -------------------------------------------------------------------------

    async def add(self, owner: str, agent: str, schedule: AnySchedule, message: str, *,
                  session_id: str | None = None, overlap: Overlap = Overlap.SKIP,
                  misfire: Misfire = Misfire.RUN_ONCE) -> Job:
        """Store a job and wake the loop; the caller has checked the agent and the session."""
        now = self.clock.now()
        first = next_fire(schedule, now, now)
        if first is None:
            raise InvalidInput("the schedule never fires: `at` is in the past")
        job = Job(new_id("job"), owner, agent, session_id, schedule, message, overlap, misfire, first, None, None,
                  now)
        await self.kernel.store.write([ops.Insert(t.jobs, [job.row()])], translate=True)  # a full disk: 503
        self._jobs[job.id] = job
        if self._loading:
            self._meanwhile[job.id] = job
        self._changed.set()
        return job

    async def remove(self, job_id: str) -> None:
        self.get(job_id)
        await self.kernel.store.write(lambda conn: repo.delete_job(conn, job_id), translate=True)
        self._jobs.pop(job_id, None)
        if self._loading:
            self._meanwhile[job_id] = None
        self._changed.set()

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)


class ScheduleArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=20_000, description="what to send to this conversation when due")
    in_s: float | None = Field(None, gt=0, le=366 * 24 * 3600, description="once, this many seconds from now")
    at: datetime | None = Field(None, description="once, at this ISO 8601 time with a zone")
    every_s: float | None = Field(None, ge=1, description="repeatedly, every this many seconds")
    cron: str | None = Field(None, description="repeatedly, on this five-field cron expression")
    tz: str = Field("UTC", description="the time zone of `cron`")


def schedule_tool(scheduler: Scheduler) -> Tool:
    """``schedule``: an agent sets a reminder or a recurring task in its own conversation."""

    async def schedule(args: ScheduleArgs, context: ToolContext) -> str:
        chosen = [name for name in ("in_s", "at", "every_s", "cron") if getattr(args, name) is not None]
        if len(chosen) != 1:
            raise ToolError("give exactly one of in_s, at, every_s or cron")
        spec: dict[str, Any]
        if args.in_s is not None:
            spec = {"at": scheduler.clock.now() + timedelta(seconds=args.in_s)}
        elif args.cron is not None:
            spec = {"cron": args.cron, "tz": args.tz}
        else:
            spec = {chosen[0]: getattr(args, chosen[0])}
        try:
            parsed = SCHEDULE.validate_python(spec)
        except ValueError as exc:
            raise ToolError(f"bad schedule: {exc}") from exc
        session = scheduler.kernel.sessions.live(context.session_id)
        owner = session.owner if session is not None else LOCAL.name
        try:
            job = await scheduler.add(owner, context.agent, parsed, args.message, session_id=context.session_id,
                                      overlap=Overlap.QUEUE)
        except InvalidInput as exc:
            raise ToolError(str(exc)) from exc
        when = job.next_fire_at.isoformat() if job.next_fire_at else "never"
        return f"scheduled {job.id}: first at {when}"

    return Tool("schedule", "Schedule a message to this conversation: once (in_s or at) or repeatedly "
                "(every_s or cron).", ScheduleArgs, schedule)


def install_scheduler(kernel: Kernel, **options: Any) -> Scheduler:
    """A scheduler the kernel owns (started after recovery, restarted if it fails) and its tool."""
    scheduler = Scheduler(kernel, **options)
    kernel.tools.add(schedule_tool(scheduler))
    kernel.add_service("scheduler", scheduler.run)
    return scheduler
