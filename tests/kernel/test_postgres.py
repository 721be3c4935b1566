"""The kernel end to end on Postgres: the same store code as SQLite, a different database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from corral.kernel import Kernel, KernelConfig
from corral.store import repo
from corral.store import tables as t
from corral.types import Decision, Disposition, ExecPolicy, Mode
from tests.helpers import (
    KernelHarness,
    new_session,
    run_events,
    select_scalar,
    seq_of,
    session_events,
    wait_event,
    wait_run,
)

LIMIT = 30.0


@pytest.fixture
async def pg_harness(postgres_url: str) -> AsyncIterator[KernelHarness]:
    harness = KernelHarness(postgres_url, KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=1.0))
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.fixture
async def pg_kernel(pg_harness: KernelHarness) -> Kernel:
    kernel = await pg_harness.start()
    assert kernel.store.dialect.name == "postgresql"
    return kernel


async def test_many_sessions_and_turns_complete_with_gap_free_events(pg_kernel: Kernel) -> None:
    kernel = pg_kernel
    async with asyncio.timeout(LIMIT):
        sessions = await asyncio.gather(*(new_session(kernel) for _ in range(6)))
        # Every turn of every session submitted at once: one starts per session, the rest queue.
        accepted = await asyncio.gather(*(
            kernel.submit(sid, f"session {i} turn {j}") for j in range(4) for i, sid in enumerate(sessions)))
        runs = await asyncio.gather(*(wait_run(kernel, a.run_id) for a in accepted))
        assert [r["status"] for r in runs] == ["completed"] * len(accepted)
        assert [r["output"] for r in runs] == [f"echo: session {i} turn {j}" for j in range(4) for i in range(6)]
        for i, sid in enumerate(sessions):
            mine = [a for a in accepted if a.session_id == sid]
            assert [a.disposition for a in mine] == [Disposition.STARTED] + [Disposition.QUEUED] * 3
            events = await session_events(kernel, sid)
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            # Runs start in arrival order, each after the previous one ended.
            order = [(seq_of(events, "run.started", a.run_id), seq_of(events, "run.completed", a.run_id))
                     for a in mine]
            flat = [seq for pair in order for seq in pair]
            assert flat == sorted(flat)
            # An observer attaching now gets every event of a run from the start.
            replay = await run_events(kernel, mine[-1].run_id)
            assert [e.type for e in replay] == ["run.queued", "run.started", "message.delta",
                                                "message.completed", "run.completed"]
            messages = await kernel.store.read(repo.session_messages, sid, include_rolled_back=True)
            assert [m.content for m in messages] == [
                text for j in range(4) for text in (f"session {i} turn {j}", f"echo: session {i} turn {j}")]
        active = await select_scalar(kernel.store, sa.select(sa.func.count()).select_from(t.runs).where(
            t.runs.c.status.in_(["running", "waiting", "queued"])))
        assert active == 0


async def test_queue_and_steer_modes(pg_kernel: Kernel) -> None:
    kernel = pg_kernel
    async with asyncio.timeout(LIMIT):
        sid = await new_session(kernel)
        first = await kernel.submit(sid, "/steps 3 300")
        await wait_event(kernel, sid, "tool.started", run_id=first.run_id)
        steer = await kernel.submit(sid, "turn left", mode=Mode.STEER)
        queued = await kernel.submit(sid, "and then this", mode=Mode.QUEUE)
        assert (steer.disposition, steer.run_id) == (Disposition.STEERED, first.run_id)
        assert queued.disposition is Disposition.QUEUED and queued.run_id != first.run_id
        done = await wait_run(kernel, first.run_id)
        assert done["status"] == "completed"
        assert done["output"] == 'done 3 steps; steering seen: ["turn left"]'
        later = await wait_run(kernel, queued.run_id)
        assert later["status"] == "completed" and later["output"] == "echo: and then this"
        events = await session_events(kernel, sid)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        steered = [e for e in events if e.type == "run.steered"]
        assert [(e.run_id, e.data["input_id"]) for e in steered] == [(first.run_id, steer.input_id)]
        assert seq_of(events, "run.completed", first.run_id) < seq_of(events, "run.started", queued.run_id)


async def test_rollback_mode_marks_messages_and_the_next_run_goes_first(pg_kernel: Kernel) -> None:
    kernel = pg_kernel
    async with asyncio.timeout(LIMIT):
        sid = await new_session(kernel)
        first = await kernel.submit(sid, "/steps 5 300")
        await wait_event(kernel, sid, "tool.started", run_id=first.run_id)
        waiting_turn = await kernel.submit(sid, "queued behind")
        fixed = await kernel.submit(sid, "the corrected message", mode=Mode.ROLLBACK)
        assert fixed.disposition is Disposition.QUEUED
        cut = await wait_run(kernel, first.run_id)
        assert cut["status"] == "cancelled"
        assert (await wait_run(kernel, fixed.run_id))["output"] == "echo: the corrected message"
        assert (await wait_run(kernel, waiting_turn.run_id))["output"] == "echo: queued behind"
        events = await session_events(kernel, sid)
        assert seq_of(events, "run.started", fixed.run_id) < seq_of(events, "run.started", waiting_turn.run_id)
        everything = await kernel.store.read(repo.session_messages, sid, include_rolled_back=True)
        context = await kernel.store.read(repo.session_messages, sid, include_rolled_back=False)
        assert {m.rolled_back for m in everything if m.run_id == first.run_id} == {True}
        assert all(m.run_id != first.run_id for m in context)


async def test_a_paused_run_waits_for_approval_and_resumes(pg_kernel: Kernel) -> None:
    kernel = pg_kernel
    async with asyncio.timeout(LIMIT):
        sid = await new_session(kernel)
        accepted = await kernel.submit(sid, '/tool echo {"text": "ok"}', policy=ExecPolicy.PAUSE)
        requested = await wait_event(kernel, sid, "run.waiting", run_id=accepted.run_id)
        (call_id,) = requested.data["pending"]
        (approval,) = await kernel.store.read(repo.approvals_of_run, accepted.run_id)
        row = await kernel.store.read(repo.get_run, accepted.run_id)
        assert row is not None and row.status == "waiting"
        assert approval.arguments == {"text": "ok"} and approval.status == "pending"
        await kernel.decide(accepted.run_id, call_id, Decision.APPROVE)
        done = await wait_run(kernel, accepted.run_id)
        assert done["status"] == "completed" and done["output"] == "tool results: ok"


async def test_state_survives_a_restart_on_postgres(pg_harness: KernelHarness) -> None:
    async with asyncio.timeout(LIMIT):
        kernel = await pg_harness.start()
        sid = await new_session(kernel, key="kept-key")
        first = await kernel.submit(sid, "before", idempotency_key="k1")
        await wait_run(kernel, first.run_id)
        await pg_harness.stop()
        kernel = await pg_harness.start()
        again = await kernel.submit(sid, "before", idempotency_key="k1")
        assert again.duplicate and again.run_id == first.run_id
        same, created = await kernel.sessions.create("assistant", "kept-key", {})
        assert not created and same["id"] == sid
        second = await kernel.submit(sid, "after")
        assert (await wait_run(kernel, second.run_id))["output"] == "echo: after"
        events = await session_events(kernel, sid)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.type for e in events if e.type.startswith("run.")] == [
            "run.queued", "run.started", "run.completed", "run.queued", "run.started", "run.completed"]
