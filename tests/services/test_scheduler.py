"""The scheduler: on time, stops when deleted, stops at once, misfire policies, crash-safe fires."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from corral.kernel import Kernel, KernelConfig
from corral.services.scheduler import Scheduler, install_scheduler
from corral.services.schedules import AtSchedule, CronSchedule, EverySchedule, next_fire
from corral.settings import Settings, default_agent
from corral.specs import AgentSpec
from corral.store import Store, repo
from corral.types import CancelMode, Misfire
from tests.api.test_sse import sse_frames
from tests.helpers import client, http_server, new_session, sqlite_url, wait_run

LIMIT = 30


@asynccontextmanager
async def scheduled(url: str, clock: Callable[[], datetime] | None = None,
                    grace: float = 60.0) -> AsyncIterator[tuple[Kernel, Scheduler]]:
    kernel = Kernel(Store(url), KernelConfig(shutdown_grace_s=1.0), initial_agents=(default_agent(),))
    scheduler = install_scheduler(kernel, misfire_grace_s=grace, **({"clock": clock} if clock else {}))
    async with kernel.running():
        await kernel.agents.wait_ready("assistant")
        yield kernel, scheduler


async def fires(kernel: Kernel, job_id: str) -> list[tuple[datetime, str, str | None]]:
    return [(r.fire_at, r.status, r.run_id) for r in await kernel.store.read(repo.job_fires, job_id)]


def test_next_fire_for_each_kind_of_schedule() -> None:
    anchor = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
    every = EverySchedule(every_s=90)
    assert next_fire(every, anchor, anchor) == anchor + timedelta(seconds=90)
    assert next_fire(every, anchor + timedelta(seconds=200), anchor) == anchor + timedelta(seconds=270)
    # 09:00 in Paris is 08:00 UTC in November.
    paris = CronSchedule(cron="0 9 * * *", tz="Europe/Paris")
    assert next_fire(paris, anchor, anchor) == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    once = AtSchedule(at=anchor + timedelta(minutes=5))
    assert next_fire(once, anchor, anchor) == anchor + timedelta(minutes=5)
    assert next_fire(once, anchor + timedelta(minutes=5), anchor) is None
    with pytest.raises(ValueError, match="cron"):
        CronSchedule(cron="every day")
    with pytest.raises(ValueError, match="time zone"):
        CronSchedule(cron="0 9 * * *", tz="Mars/Olympus")
    with pytest.raises(ValueError, match="zone"):
        AtSchedule(at=datetime(2026, 12, 1, 9, 0))


async def test_an_every_second_job_fires_on_time_and_stops_when_deleted(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel), client(base) as http:
        sid = (await http.post("/v1/sessions", json={})).json()["id"]
        created = await http.post("/v1/jobs", json={"session_id": sid, "schedule": {"every_s": 1},
                                                    "message": "tick", "overlap": "queue"})
        assert created.status_code == 201, created.text
        job = created.json()
        async with http.stream("GET", f"/v1/sessions/{sid}/events") as response:
            completed = []
            async for frame in sse_frames(response):
                if frame.event == "run.completed":
                    completed.append(time.monotonic())
                    if len(completed) == 2:
                        break
        assert 0.8 < completed[1] - completed[0] < 1.5  # one second apart, give or take the machine
        recorded = await fires(kernel, job["id"])
        assert [status for _, status, _ in recorded][:2] == ["fired", "fired"]
        first_due = datetime.fromisoformat(job["next_fire_at"])
        assert recorded[0][0] == first_due
        run = (await http.get(f"/v1/runs/{recorded[0][2]}")).json()
        assert run["output"] == "echo: tick"
        lateness = (datetime.fromisoformat(run["created_at"]) - first_due).total_seconds()
        assert 0 <= lateness < 0.5  # fired when due, not at some polling tick

        assert (await http.delete(f"/v1/jobs/{job['id']}")).status_code == 204
        assert (await http.get(f"/v1/jobs/{job['id']}")).status_code == 404
        count = len(await fires(kernel, job["id"]))
        # Nothing more fires: wait past the next due time (this is a wait for an absence).
        await asyncio.sleep(1.5)
        assert len(await fires(kernel, job["id"])) == count


async def test_stopping_the_scheduler_is_immediate_with_a_job_due_in_an_hour(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path)) as (kernel, scheduler):
        await scheduler.add("local", "assistant", EverySchedule(every_s=3600), "later")
        (task,) = kernel._service_tasks
        began = time.monotonic()
        task.cancel()
        await asyncio.wait([task])
        assert time.monotonic() - began < 0.1


@pytest.mark.parametrize("policy", [Misfire.RUN_ONCE, Misfire.SKIP])
async def test_a_fire_missed_while_down_follows_the_misfire_policy(tmp_path: Path, policy: Misfire) -> None:
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with scheduled(url) as (kernel, scheduler):
            session = await new_session(kernel)
            job = await scheduler.add("local", "assistant", EverySchedule(every_s=600), "catch up",
                                      session_id=session, misfire=policy)
        # Down for two hours: the restart's clock says so.
        later = lambda: datetime.now(UTC) + timedelta(hours=2)  # noqa: E731
        async with scheduled(url, clock=later) as (kernel, scheduler):
            await scheduler.wait_handled(1)
            recorded = await fires(kernel, job.id)
            assert [status for _, status, _ in recorded] == ["fired" if policy is Misfire.RUN_ONCE else "missed"]
            assert recorded[0][0] == job.next_fire_at  # the missed due time, once: not twelve catch-ups
            resumed = scheduler.get(job.id).next_fire_at
            assert resumed is not None and resumed > later() - timedelta(seconds=5)  # back on schedule from now
            if policy is Misfire.RUN_ONCE:
                assert (await wait_run(kernel, recorded[0][2] or ""))["output"] == "echo: catch up"


async def test_a_crash_between_enqueue_and_record_neither_loses_nor_doubles_the_fire(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with scheduled(url) as (kernel, scheduler):
            session = await new_session(kernel)
            job = await scheduler.add("local", "assistant", AtSchedule(at=datetime.now(UTC) + timedelta(hours=1)),
                                      "exactly once", session_id=session)
            due = job.next_fire_at
            assert due is not None
            # The fire got as far as its enqueue, then the process died before recording it.
            key = f"job:{job.id}:{due.isoformat()}"
            enqueued = await kernel.submit(session, "exactly once", origin="scheduler", idempotency_key=key)
            await wait_run(kernel, enqueued.run_id)
        at_due = lambda: due + timedelta(seconds=1)  # noqa: E731
        async with scheduled(url, clock=at_due) as (kernel, scheduler):
            await scheduler.wait_handled(1)
            recorded = await fires(kernel, job.id)
            assert recorded == [(due, "fired", enqueued.run_id)]  # the same run: the enqueue was a no-op
            runs = await kernel.store.read(repo.list_runs, session_ids=[session], statuses=None, limit=10, offset=0)
            assert len(runs) == 1
            assert scheduler.get(job.id).next_fire_at is None  # a one-shot job is done


async def test_a_due_fire_that_never_got_enqueued_is_made_after_a_restart(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with scheduled(url) as (kernel, scheduler):
            job = await scheduler.add("local", "assistant", AtSchedule(at=datetime.now(UTC) + timedelta(hours=1)),
                                      "not lost")
        due = job.next_fire_at
        assert due is not None
        async with scheduled(url, clock=lambda: due + timedelta(seconds=1)) as (kernel, scheduler):
            await scheduler.wait_handled(1)
            ((_, status, run_id),) = await fires(kernel, job.id)
            assert status == "fired"
            assert (await wait_run(kernel, run_id or ""))["output"] == "echo: not lost"


async def test_an_agent_sets_a_reminder_with_the_schedule_tool(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path)) as (kernel, scheduler):
        await kernel.agents.create(AgentSpec(name="planner", tools=["schedule"]))
        await kernel.agents.wait_ready("planner")
        session = await new_session(kernel, "planner")
        asked = await kernel.submit(session, '/tool schedule {"message": "stand up and stretch", "in_s": 0.5}')
        reply = await wait_run(kernel, asked.run_id)
        assert reply["output"].startswith("tool results: scheduled job_")
        (job,) = scheduler.list()
        assert job.session_id == session and job.agent == "planner" and job.owner == "local"
        await scheduler.wait_handled(1)
        ((_, status, run_id),) = await fires(kernel, job.id)
        reminder = await wait_run(kernel, run_id or "")
        assert status == "fired" and reminder["session_id"] == session
        assert reminder["output"] == "echo: stand up and stretch"
        bad = await kernel.submit(session, '/tool schedule {"message": "x", "in_s": 1, "every_s": 5}')
        assert "exactly one of" in (await wait_run(kernel, bad.run_id))["output"]


async def test_scheduled_runs_are_background_class(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path)) as (kernel, _scheduler):
        session = await new_session(kernel)
        blocker = await kernel.submit(session, "/sleep 30")
        scheduled_input = await kernel.submit(session, "later", origin="scheduler")
        interactive = await kernel.submit(session, "now")
        handles = {run_id: kernel.run_handle(run_id) for run_id in (scheduled_input.run_id, interactive.run_id)}
        assert handles[scheduled_input.run_id] is not None and handles[scheduled_input.run_id].background
        assert handles[interactive.run_id] is not None and not handles[interactive.run_id].background
        await kernel.cancel(blocker.run_id, CancelMode.HARD)
