"""The scheduler: on time, stops when deleted, stops at once, misfire policies, crash-safe fires.

Time is a ``HandClock`` wherever a test is about when things happen: the test moves it on and
the scheduler wakes at once, so nothing waits for real seconds. The system clock has tests of
its own (its sleep ends at the deadline, on a change, and at once when cancelled).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from corral.kernel import Kernel, KernelConfig
from corral.services.scheduler import Clock, Scheduler, SystemClock, install_scheduler
from corral.services.schedules import AtSchedule, CronSchedule, EverySchedule, next_fire
from corral.settings import Settings, default_agent
from corral.specs import AgentSpec
from corral.store import Store, repo
from corral.types import CancelMode, Misfire, Overlap
from tests.helpers import client, http_server, new_session, sqlite_url, wait_run

LIMIT = 30
START = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


class HandClock:
    """Time that moves only when the test moves it. A sleeper whose deadline it passes wakes at
    once, and ``asleep`` tells the test when the scheduler has done all it had to and sleeps."""

    def __init__(self, start: datetime = START):
        self._now = start
        # The scheduler's current sleep: its deadline, its wake event, and the clock's own alarm.
        self._sleeper: tuple[datetime | None, asyncio.Event, asyncio.Event] | None = None
        self._slept = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, deadline: datetime | None, wake: asyncio.Event) -> None:
        if wake.is_set() or (deadline is not None and deadline <= self._now):
            return
        alarm = asyncio.Event()
        self._sleeper = (deadline, wake, alarm)
        self._slept.set()
        waits = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(alarm.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            self._sleeper = None

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        if self._sleeper is not None:
            deadline, _wake, alarm = self._sleeper
            if deadline is not None and deadline <= self._now:
                alarm.set()

    async def asleep(self) -> datetime | None:
        """Wait until the scheduler sleeps with nothing left to do now; the time it sleeps until."""
        while self._sleeper is None or self._sleeper[1].is_set() or self._sleeper[2].is_set():
            self._slept.clear()
            await self._slept.wait()
        return self._sleeper[0]


class WatchedSystemClock(SystemClock):
    """The system clock, saying when the scheduler has gone to sleep on it."""

    def __init__(self) -> None:
        self.sleeping = asyncio.Event()

    async def sleep_until(self, deadline: datetime | None, wake: asyncio.Event) -> None:
        self.sleeping.set()
        await super().sleep_until(deadline, wake)


@asynccontextmanager
async def scheduled(url: str, clock: Clock | None = None,
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


async def test_a_job_added_while_the_scheduler_loads_its_jobs_is_kept(tmp_path: Path) -> None:
    """The service's first read of the jobs table may predate a job added meanwhile (CI caught
    it: the job vanished from memory and never fired). Forced here: the read is held until the
    job is stored."""
    clock = HandClock()
    store = Store(sqlite_url(tmp_path))
    read, loading, loaded = store.read, asyncio.Event(), asyncio.Event()

    async def held(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is repo.all_jobs and not loaded.is_set():
            rows = await read(fn, *args, **kwargs)  # the snapshot, taken before the job is stored
            loading.set()
            await loaded.wait()
            return rows
        return await read(fn, *args, **kwargs)

    store.read = held  # type: ignore[method-assign]
    kernel = Kernel(store, KernelConfig(shutdown_grace_s=1.0), initial_agents=(default_agent(),))
    scheduler = install_scheduler(kernel, clock=clock)
    async with asyncio.timeout(LIMIT), kernel.running():
        await loading.wait()
        session = await new_session(kernel)
        job = await scheduler.add("local", "assistant", EverySchedule(every_s=1), "tick", session_id=session)
        loaded.set()
        assert await clock.asleep() == job.next_fire_at
        assert scheduler.get(job.id) is not None


async def test_an_every_second_job_fires_when_due_and_stops_when_deleted(tmp_path: Path) -> None:
    clock = HandClock()
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path), clock=clock) as (kernel, scheduler):
        session = await new_session(kernel)
        job = await scheduler.add("local", "assistant", EverySchedule(every_s=1), "tick", session_id=session,
                                  overlap=Overlap.QUEUE)
        first_due = job.next_fire_at
        assert first_due == START + timedelta(seconds=1)
        # It sleeps exactly until the job is due, not until some polling tick.
        assert await clock.asleep() == first_due
        assert await fires(kernel, job.id) == []
        clock.advance(0.5)
        assert await clock.asleep() == first_due  # not due yet: still asleep, nothing fired
        assert await fires(kernel, job.id) == []
        for n in (1, 2):
            clock.advance(0.5 if n == 1 else 1)
            assert await clock.asleep() == first_due + timedelta(seconds=n)  # fired, and asleep until the next
        recorded = await fires(kernel, job.id)
        assert [(due, status) for due, status, _ in recorded] == [
            (first_due, "fired"), (first_due + timedelta(seconds=1), "fired")]
        for _, _, run_id in recorded:
            assert (await wait_run(kernel, run_id or ""))["output"] == "echo: tick"
        assert scheduler.get(job.id).last_run_id == recorded[1][2]

        await scheduler.remove(job.id)
        assert await clock.asleep() is None  # nothing left to wake for
        clock.advance(10)  # well past every due time the job would have had
        assert await clock.asleep() is None
        assert len(await fires(kernel, job.id)) == 2


async def test_the_system_clock_fires_a_job_when_it_is_due(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path)) as (kernel, scheduler):
        session = await new_session(kernel)
        due = datetime.now(UTC) + timedelta(seconds=0.05)
        job = await scheduler.add("local", "assistant", AtSchedule(at=due), "soon", session_id=session)
        await scheduler.wait_handled(1)
        ((fired_at, status, run_id),) = await fires(kernel, job.id)
        assert (fired_at, status) == (due, "fired")
        run = await wait_run(kernel, run_id or "")
        assert run["output"] == "echo: soon"
        assert run["created_at"] >= due  # not before its time


async def test_the_system_clocks_sleep_ends_at_its_deadline_on_a_change_and_when_cancelled() -> None:
    clock, wake = SystemClock(), asyncio.Event()
    async with asyncio.timeout(LIMIT):
        began = time.monotonic()
        await clock.sleep_until(clock.now() + timedelta(seconds=0.05), wake)
        assert time.monotonic() - began >= 0.04  # the event loop's timer, to its resolution
        await clock.sleep_until(clock.now() - timedelta(seconds=1), wake)  # a deadline passed: at once
        sleeper = asyncio.create_task(clock.sleep_until(None, wake))
        await asyncio.sleep(0)  # one loop turn: it is asleep, with no deadline
        assert not sleeper.done()
        began = time.monotonic()
        wake.set()
        await sleeper
        assert time.monotonic() - began < 0.1
        await clock.sleep_until(None, wake)  # already woken: at once
        wake.clear()
        sleeper = asyncio.create_task(clock.sleep_until(clock.now() + timedelta(hours=1), wake))
        await asyncio.sleep(0)
        began = time.monotonic()
        sleeper.cancel()
        await asyncio.wait([sleeper])
        assert sleeper.cancelled() and time.monotonic() - began < 0.1


async def test_stopping_the_scheduler_is_immediate_with_a_job_due_in_an_hour(tmp_path: Path) -> None:
    """Invariant 14, the scheduler's half: cancelling its task while it sleeps on the system
    clock toward a job due in an hour takes well under 100 ms."""
    clock = WatchedSystemClock()
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path)) as (kernel, _installed):
        scheduler = Scheduler(kernel, clock=clock)  # its task is this test's, to cancel
        await scheduler.add("local", "assistant", EverySchedule(every_s=3600), "later")
        task = asyncio.create_task(scheduler.run())
        await clock.sleeping.wait()
        assert not task.done()
        began = time.monotonic()
        task.cancel()
        await asyncio.wait([task])
        assert time.monotonic() - began < 0.1
        assert task.cancelled()


@pytest.mark.parametrize("policy", [Misfire.RUN_ONCE, Misfire.SKIP])
async def test_a_fire_missed_while_down_follows_the_misfire_policy(tmp_path: Path, policy: Misfire) -> None:
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with scheduled(url) as (kernel, scheduler):
            session = await new_session(kernel)
            job = await scheduler.add("local", "assistant", EverySchedule(every_s=600), "catch up",
                                      session_id=session, misfire=policy)
        # Down for two hours: the restart's clock says so.
        later = HandClock(datetime.now(UTC) + timedelta(hours=2))
        async with scheduled(url, clock=later) as (kernel, scheduler):
            await scheduler.wait_handled(1)
            recorded = await fires(kernel, job.id)
            assert [status for _, status, _ in recorded] == ["fired" if policy is Misfire.RUN_ONCE else "missed"]
            assert recorded[0][0] == job.next_fire_at  # the missed due time, once: not twelve catch-ups
            resumed = scheduler.get(job.id).next_fire_at
            assert resumed is not None  # back on schedule from now
            assert later.now() < resumed <= later.now() + timedelta(seconds=600)
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
        async with scheduled(url, clock=HandClock(due + timedelta(seconds=1))) as (kernel, scheduler):
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
        async with scheduled(url, clock=HandClock(due + timedelta(seconds=1))) as (kernel, scheduler):
            await scheduler.wait_handled(1)
            ((_, status, run_id),) = await fires(kernel, job.id)
            assert status == "fired"
            assert (await wait_run(kernel, run_id or ""))["output"] == "echo: not lost"


async def test_an_agent_sets_a_reminder_with_the_schedule_tool(tmp_path: Path) -> None:
    clock = HandClock()
    async with asyncio.timeout(LIMIT), scheduled(sqlite_url(tmp_path), clock=clock) as (kernel, scheduler):
        await kernel.agents.create(AgentSpec(name="planner", tools=["schedule"]))
        await kernel.agents.wait_ready("planner")
        session = await new_session(kernel, "planner")
        asked = await kernel.submit(session, '/tool schedule {"message": "stand up and stretch", "in_s": 90}')
        reply = await wait_run(kernel, asked.run_id)
        (job,) = scheduler.list()
        due = START + timedelta(seconds=90)
        assert reply["output"] == f"tool results: scheduled {job.id}: first at {due.isoformat()}"
        assert job.session_id == session and job.agent == "planner" and job.owner == "local"
        assert job.next_fire_at == due and job.overlap is Overlap.QUEUE
        clock.advance(90)
        await scheduler.wait_handled(1)
        ((fire_at, status, run_id),) = await fires(kernel, job.id)
        reminder = await wait_run(kernel, run_id or "")
        assert (fire_at, status) == (due, "fired") and reminder["session_id"] == session
        assert reminder["output"] == "echo: stand up and stretch"
        bad = await kernel.submit(session, '/tool schedule {"message": "x", "in_s": 1, "every_s": 5}')
        assert "exactly one of" in (await wait_run(kernel, bad.run_id))["output"]


async def test_jobs_over_http_are_created_read_listed_and_deleted(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        sid = (await http.post("/v1/sessions", json={})).json()["id"]
        before = datetime.now(UTC)
        created = await http.post("/v1/jobs", json={"session_id": sid, "schedule": {"every_s": 3600},
                                                    "message": "tick", "overlap": "queue"})
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["session_id"] == sid and job["message"] == "tick" and job["overlap"] == "queue"
        assert job["schedule"] == {"every_s": 3600.0} and job["last_fire_at"] is None
        due = datetime.fromisoformat(job["next_fire_at"])
        assert due == datetime.fromisoformat(job["created_at"]) + timedelta(hours=1) and due > before
        assert (await http.get(f"/v1/jobs/{job['id']}")).json() == job
        assert [j["id"] for j in (await http.get("/v1/jobs")).json()] == [job["id"]]
        assert (await http.get(f"/v1/jobs/{job['id']}/fires")).json() == []
        assert (await http.delete(f"/v1/jobs/{job['id']}")).status_code == 204
        assert (await http.get(f"/v1/jobs/{job['id']}")).status_code == 404
        assert (await http.get("/v1/jobs")).json() == []


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
