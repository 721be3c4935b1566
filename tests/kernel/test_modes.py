"""Arrival modes through the real kernel (DESIGN.md section 1, the modes table).

To make a session busy for as long as a test needs, without timing, a "gated" agent
asks for approval before every ``wait`` call: its run parks in ``waiting`` until the
test approves. Everything else synchronises on the session's event log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from corral.errors import SessionBusy, TooManyPending
from corral.kernel import Kernel, KernelConfig
from corral.settings import default_agent
from corral.specs import AgentSpec
from corral.store import repo
from corral.store import tables as t
from corral.types import Decision, Disposition, Mode
from tests.helpers import (
    GATED,
    KernelHarness,
    agent_session,
    get_run,
    new_session,
    park,
    run_events,
    select_all,
    seq_of,
    session_events,
    sqlite_url,
    wait_event,
    wait_run,
)


async def rows(kernel: Kernel, table: sa.Table, session: str) -> list[Any]:
    return await select_all(kernel.store, sa.select(table).where(table.c.session_id == session))


async def messages(kernel: Kernel, session: str) -> list[Any]:
    return list(await kernel.store.read(repo.session_messages, session, include_rolled_back=True))


# --- queue -------------------------------------------------------------------------------


async def test_queue_runs_in_arrival_order_one_at_a_time(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        queued = [await kernel.submit(session, f"message {n}") for n in range(4)]
        assert all(a.disposition is Disposition.QUEUED for a in queued)
        assert len({a.run_id for a in queued}) == 4
        for accepted in queued:
            assert (await get_run(kernel, accepted.run_id))["status"] == "queued"
        await kernel.decide(blocker, call, Decision.APPROVE)
        for n, accepted in enumerate(queued):
            run = await wait_run(kernel, accepted.run_id)
            assert run["status"] == "completed"
            assert run["output"] == f"echo: message {n}"
        events = await session_events(kernel, session)
        order = [blocker] + [a.run_id for a in queued]
        starts = [seq_of(events, "run.started", r) for r in order]
        ends = [seq_of(events, "run.completed", r) for r in order]
        assert starts == sorted(starts)
        # One active run at a time: each starts only after the previous one ended.
        for previous_end, next_start in zip(ends, starts[1:], strict=False):
            assert previous_end < next_start


# --- collect -----------------------------------------------------------------------------


async def test_collect_merges_waiting_messages_into_one_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        before = await kernel.submit(session, "queued first")
        burst = [await kernel.submit(session, f"part {n}", mode=Mode.COLLECT) for n in range(3)]
        assert burst[0].disposition is Disposition.QUEUED
        assert [a.disposition for a in burst[1:]] == [Disposition.COLLECTED, Disposition.COLLECTED]
        assert len({a.run_id for a in burst}) == 1
        assert burst[0].run_id != before.run_id
        await kernel.decide(blocker, call, Decision.APPROVE)
        assert (await wait_run(kernel, before.run_id))["output"] == "echo: queued first"
        run = await wait_run(kernel, burst[0].run_id)
        assert run["status"] == "completed"
        assert run["output"] == "echo: part 0\npart 1\npart 2"
        started = next(e for e in await run_events(kernel, run["id"]) if e.type == "run.started")
        assert started.data["input_ids"] == [a.input_id for a in burst]


async def test_collect_debounce_waits_for_the_burst_to_settle(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        loop = asyncio.get_running_loop()
        debounce = 0.3
        first = await kernel.submit(session, "one", mode=Mode.COLLECT, debounce_ms=int(debounce * 1000))
        assert first.disposition is Disposition.STARTED
        # The run is debouncing (not begun yet): the rest of the burst joins it.
        last_sent = loop.time()
        second = await kernel.submit(session, "two", mode=Mode.COLLECT, debounce_ms=int(debounce * 1000))
        assert second.disposition is Disposition.COLLECTED
        assert second.run_id == first.run_id
        await wait_event(kernel, session, "run.started", run_id=first.run_id)
        assert loop.time() - last_sent >= debounce - 0.01, "the run began before the burst settled"
        run = await wait_run(kernel, first.run_id)
        assert run["output"] == "echo: one\ntwo"


async def test_collect_without_a_collect_tail_queues_a_new_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        a = await kernel.submit(session, "a", mode=Mode.COLLECT)
        b = await kernel.submit(session, "b")
        c = await kernel.submit(session, "c", mode=Mode.COLLECT)
        assert c.disposition is Disposition.QUEUED and c.run_id not in (a.run_id, b.run_id)
        await kernel.decide(blocker, call, Decision.APPROVE)
        outputs = [(await wait_run(kernel, x.run_id))["output"] for x in (a, b, c)]
        assert outputs == ["echo: a", "echo: b", "echo: c"]


# --- steer -------------------------------------------------------------------------------


async def test_steer_is_delivered_at_the_next_step_boundary(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        active = await kernel.submit(session, "/steps 3 200")
        await wait_event(kernel, session, "tool.started", run_id=active.run_id)
        steer = await kernel.submit(session, "also mention llamas", mode=Mode.STEER)
        assert steer.disposition is Disposition.STEERED
        assert steer.run_id == active.run_id
        run = await wait_run(kernel, active.run_id)
        assert run["status"] == "completed"
        assert run["output"] == 'done 3 steps; steering seen: ["also mention llamas"]'
        events = await run_events(kernel, active.run_id)
        steered = [e for e in events if e.type == "run.steered"]
        assert [e.data["input_id"] for e in steered] == [steer.input_id]
        # Delivered before the next model call: between two tool steps, not after the last.
        tool_starts = [e.seq for e in events if e.type == "tool.started"]
        assert tool_starts[0] < steered[0].seq < tool_starts[-1]
        assert not [e for e in await session_events(kernel, session) if e.type == "input.requeued"]
        stored = [m for m in await messages(kernel, session) if m.input_id == steer.input_id]
        assert [(m.role, m.run_id, m.rolled_back) for m in stored] == [("user", active.run_id, False)]


async def test_steer_after_the_last_boundary_becomes_the_next_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        await kernel.agents.create(AgentSpec(name="slow-talker", provider_options={"token_ms": 40}))
        await kernel.agents.wait_ready("slow-talker")
        session = await new_session(kernel, "slow-talker")
        active = await kernel.submit(session, "one two three four five six seven eight")
        queued = await kernel.submit(session, "queued before the steer")
        # The final answer is streaming: no step boundary is left in this run.
        await wait_event(kernel, session, "message.delta", run_id=active.run_id)
        steer = await kernel.submit(session, "too late to steer", mode=Mode.STEER)
        assert steer.disposition is Disposition.STEERED and steer.run_id == active.run_id
        run = await wait_run(kernel, active.run_id)
        assert run["output"] == "echo: one two three four five six seven eight"
        requeued = await wait_event(kernel, session, "input.requeued")
        assert requeued.data["input_ids"] == [steer.input_id]
        assert requeued.data["from_run_id"] == active.run_id
        follow_up = requeued.data["run_id"]
        assert requeued.run_id == follow_up != active.run_id
        follow = await wait_run(kernel, follow_up)
        assert follow["status"] == "completed"
        assert follow["output"] == "echo: too late to steer"
        assert (await wait_run(kernel, queued.run_id))["output"] == "echo: queued before the steer"
        events = await session_events(kernel, session)
        # Never lost, and the very next run: before the work that was already queued.
        assert seq_of(events, "run.started", follow_up) < seq_of(events, "run.started", queued.run_id)
        assert not [e for e in events if e.type == "run.steered"]
        inputs = {r.id: r for r in await rows(kernel, t.inputs, session)}
        assert inputs[steer.input_id].run_id == follow_up
        assert inputs[steer.input_id].status == "consumed"


async def test_steer_to_an_idle_session_starts_a_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "hello", mode=Mode.STEER)
        assert accepted.disposition is Disposition.STARTED
        assert (await wait_run(kernel, accepted.run_id))["output"] == "echo: hello"


async def test_a_steer_survives_a_rollback_that_follows_it(kernel: Kernel) -> None:
    """The steer arrived first, so it is not rolled back with the run it was meant for."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        active = await kernel.submit(session, "/steps 3 200")
        await wait_event(kernel, session, "tool.started", run_id=active.run_id)
        steer = await kernel.submit(session, "steer me", mode=Mode.STEER)
        rollback = await kernel.submit(session, "corrected", mode=Mode.ROLLBACK)
        assert (await wait_run(kernel, active.run_id))["status"] == "cancelled"
        requeued = await wait_event(kernel, session, "input.requeued")
        assert requeued.data["input_ids"] == [steer.input_id]
        follow = await wait_run(kernel, requeued.data["run_id"])
        assert follow["output"] == "echo: steer me"
        assert (await wait_run(kernel, rollback.run_id))["output"] == "echo: corrected"
        events = await session_events(kernel, session)
        assert seq_of(events, "run.started", follow["id"]) < seq_of(events, "run.started", rollback.run_id)
        live = [m.content for m in await messages(kernel, session) if not m.rolled_back and m.role == "user"]
        assert live == ["steer me", "corrected"]


async def test_a_steer_after_an_interrupt_joins_the_interrupting_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        active = await kernel.submit(session, "/steps 5 200")
        await wait_event(kernel, session, "tool.started", run_id=active.run_id)
        corrected = await kernel.submit(session, "corrected", mode=Mode.ROLLBACK)
        steer = await kernel.submit(session, "and be brief", mode=Mode.STEER)
        assert steer.disposition is Disposition.STEERED
        assert steer.run_id == corrected.run_id  # the run that replaces the one being cancelled
        assert (await wait_run(kernel, active.run_id))["status"] == "cancelled"
        run = await wait_run(kernel, corrected.run_id)
        assert run["output"] == "echo: corrected\nand be brief"
        assert not [e for e in await session_events(kernel, session) if e.type == "input.requeued"]


# --- interrupt and rollback --------------------------------------------------------------


async def test_interrupt_cancels_the_active_run_and_runs_next(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        await kernel.agents.create(AgentSpec(name="talker", provider_options={"token_ms": 30}))
        await kernel.agents.wait_ready("talker")
        session = await new_session(kernel, "talker")
        words = " ".join(f"w{n}" for n in range(100))
        active = await kernel.submit(session, words)
        waiting = await kernel.submit(session, "ordinary queued work")
        await wait_event(kernel, session, "message.delta", run_id=active.run_id)
        interrupt = await kernel.submit(session, "stop, do this instead", mode=Mode.INTERRUPT)
        assert interrupt.disposition is Disposition.QUEUED
        cancelled = await wait_run(kernel, active.run_id)
        assert cancelled["status"] == "cancelled"
        assert cancelled["error"]["code"] == "cancelled"
        assert "interrupted" in cancelled["error"]["message"]
        # Soft: stopped between two tokens, well before the grace period, partial output kept.
        assert cancelled["output"] and ("echo: " + words).startswith(cancelled["output"])
        assert cancelled["output"] != "echo: " + words
        assert (await wait_run(kernel, interrupt.run_id))["output"] == "echo: stop, do this instead"
        assert (await wait_run(kernel, waiting.run_id))["output"] == "echo: ordinary queued work"
        events = await session_events(kernel, session)
        assert (seq_of(events, "run.cancelled", active.run_id)
                < seq_of(events, "run.started", interrupt.run_id)
                < seq_of(events, "run.started", waiting.run_id))
        # A plain interrupt keeps the cancelled run's messages in the context.
        assert not any(m.rolled_back for m in await messages(kernel, session))


async def test_interrupt_of_a_parked_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, _ = await park(kernel, session)
        interrupt = await kernel.submit(session, "never mind", mode=Mode.INTERRUPT)
        assert (await wait_run(kernel, blocker))["status"] == "cancelled"
        assert (await wait_run(kernel, interrupt.run_id))["status"] == "completed"


async def test_rollback_marks_the_cancelled_runs_messages(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        first = await kernel.submit(session, "first message")
        assert (await wait_run(kernel, first.run_id))["output"] == "echo: first message"
        active = await kernel.submit(session, "/steps 5 200")
        await wait_event(kernel, session, "tool.completed", run_id=active.run_id)
        rollback = await kernel.submit(session, "corrected message", mode=Mode.ROLLBACK)
        assert rollback.disposition is Disposition.QUEUED
        assert (await wait_run(kernel, active.run_id))["status"] == "cancelled"
        run = await wait_run(kernel, rollback.run_id)
        # Had the rolled-back "/steps" turn stayed in the context, the demo model would
        # still be following that directive; it answers the corrected message alone.
        assert run["output"] == "echo: corrected message"
        stored = await messages(kernel, session)
        rolled = [m for m in stored if m.run_id == active.run_id]
        assert rolled, "rolled-back messages stay in the store for audit"
        assert {m.role for m in rolled} >= {"user", "assistant", "tool"}
        assert all(m.rolled_back for m in rolled)
        kept = [m for m in stored if m.run_id != active.run_id]
        assert not any(m.rolled_back for m in kept)
        assert [m.content for m in kept] == ["first message", "echo: first message",
                                             "corrected message", "echo: corrected message"]
        context = await kernel.store.read(repo.session_messages, session, include_rolled_back=False)
        assert [m.run_id for m in context] == [first.run_id] * 2 + [rollback.run_id] * 2


# --- reject, back-pressure, idempotency --------------------------------------------------


async def test_reject_on_a_busy_session_stores_nothing(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        before = (await rows(kernel, t.inputs, session), await rows(kernel, t.runs, session),
                  await session_events(kernel, session))
        with pytest.raises(SessionBusy):
            await kernel.submit(session, "not now", mode=Mode.REJECT)
        with pytest.raises(SessionBusy):
            await kernel.submit(session, "not now", mode=Mode.REJECT, idempotency_key="k")
        after = (await rows(kernel, t.inputs, session), await rows(kernel, t.runs, session),
                 await session_events(kernel, session))
        assert [len(x) for x in after] == [len(x) for x in before]
        assert kernel.session_view(session) == {"active_run_id": blocker, "active_status": "waiting", "queued": 0}
        await kernel.decide(blocker, call, Decision.APPROVE)
        await wait_run(kernel, blocker)
        idle = await kernel.submit(session, "now", mode=Mode.REJECT, idempotency_key="k")
        assert idle.disposition is Disposition.STARTED and not idle.duplicate
        assert (await wait_run(kernel, idle.run_id))["output"] == "echo: now"


async def test_too_many_pending_inputs(tmp_path: Path) -> None:
    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(max_pending_inputs=3, interrupt_grace_s=0.5,
                                                               shutdown_grace_s=1.0),
                            agents=(default_agent(), GATED))
    try:
        async with asyncio.timeout(15):
            kernel = await harness.start()
            session = await new_session(kernel, GATED.name)
            blocker, call = await park(kernel, session)
            accepted = [
                await kernel.submit(session, "a"),
                await kernel.submit(session, "b", mode=Mode.COLLECT),
                await kernel.submit(session, "c", mode=Mode.STEER),
            ]
            inputs_before = len(await rows(kernel, t.inputs, session))
            for mode in (Mode.QUEUE, Mode.COLLECT, Mode.STEER, Mode.INTERRUPT):
                with pytest.raises(TooManyPending):
                    await kernel.submit(session, "one too many", mode=mode)
            assert len(await rows(kernel, t.inputs, session)) == inputs_before
            # Other sessions are not affected by this one's back-pressure.
            other = await new_session(kernel)
            assert (await wait_run(kernel, (await kernel.submit(other, "hi")).run_id))["status"] == "completed"
            await kernel.decide(blocker, call, Decision.APPROVE)
            for a in accepted:
                assert (await wait_run(kernel, a.run_id))["status"] == "completed"
            again = await kernel.submit(session, "room again")
            assert (await wait_run(kernel, again.run_id))["output"] == "echo: room again"
    finally:
        await harness.stop()


async def test_idempotency_key_returns_the_same_input_and_stores_once(harness: KernelHarness,
                                                                      kernel: Kernel) -> None:
    async with asyncio.timeout(15):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        first = await kernel.submit(session, "once", idempotency_key="key-1")
        assert first.disposition is Disposition.QUEUED and not first.duplicate
        again = await kernel.submit(session, "once", idempotency_key="key-1")
        assert (again.input_id, again.run_id, again.disposition) == (first.input_id, first.run_id,
                                                                     first.disposition)
        assert again.duplicate
        concurrent = await asyncio.gather(*(kernel.submit(session, "once", idempotency_key="key-2")
                                            for _ in range(5)))
        assert len({(a.input_id, a.run_id) for a in concurrent}) == 1
        inputs = await rows(kernel, t.inputs, session)
        assert sorted(r.idempotency_key for r in inputs if r.idempotency_key) == ["key-1", "key-2"]
        assert len(await rows(kernel, t.runs, session)) == 3
        # The key outlives the process: after a restart the stored input answers.
        await harness.stop()
        kernel = await harness.start()
        after_restart = await kernel.submit(session, "once", idempotency_key="key-1")
        assert (after_restart.input_id, after_restart.run_id) == (first.input_id, first.run_id)
        assert after_restart.duplicate
        assert len(await rows(kernel, t.inputs, session)) == len(inputs)
        await kernel.decide(blocker, call, Decision.APPROVE)
        run = await wait_run(kernel, first.run_id)
        assert run["output"] == "echo: once"
        # The key-1 input's message, stored once (the key-2 input, also "once", may be running by now).
        messages_once = [m for m in await messages(kernel, session) if m.input_id == first.input_id]
        assert len(messages_once) == 1
        assert run["error"] is None
