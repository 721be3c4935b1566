"""Cancellation through the real kernel: soft at the next boundary, hard at once (invariant 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from corral.errors import Conflict, NotFound
from corral.kernel import Kernel
from corral.specs import AgentSpec
from corral.store import repo
from corral.store import tables as t
from corral.types import CancelMode, Decision, Disposition, Mode, RunStatus
from tests.helpers import (
    GATED,
    agent_session,
    get_run,
    new_session,
    park,
    run_events,
    select_all,
    session_events,
    wait_event,
    wait_run,
)

LONG_WAIT = '/tool wait {"ms": 30000}'


async def time_hard_cancel(kernel: Kernel, run_id: str) -> float:
    """Seconds from a hard cancel request until the run has stopped (its end is being recorded).

    Committing the terminal event (an fsync) is measured apart, with the store's latency.
    """
    handle = kernel.run_handle(run_id)
    assert handle is not None and handle.task is not None
    loop = asyncio.get_running_loop()
    began = loop.time()
    await kernel.cancel(run_id, CancelMode.HARD)
    await handle.finished.wait()
    elapsed = loop.time() - began
    await handle.task  # the run's task ends too, after its final write
    assert loop.time() - began < 1.0
    return elapsed


async def inputs_of(kernel: Kernel, run_id: str) -> list[Any]:
    return await select_all(kernel.store, sa.select(t.inputs).where(t.inputs.c.run_id == run_id))


async def test_soft_cancel_while_streaming_keeps_the_partial_output(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, AgentSpec(name="talker", provider_options={"token_ms": 20}))
        words = " ".join(f"word{n}" for n in range(200))
        accepted = await kernel.submit(session, words)
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        status = await kernel.cancel(accepted.run_id, CancelMode.SOFT)
        assert status is RunStatus.RUNNING  # taken note of; the run stops at its next boundary
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled"
        assert run["error"] == {"code": "cancelled", "message": "cancelled by request"}
        full = "echo: " + words
        assert run["output"] and full.startswith(run["output"]) and run["output"] != full
        events = await run_events(kernel, accepted.run_id)
        assert events[-1].type == "run.cancelled"
        assert events[-1].data["output"] == run["output"]
        streamed = "".join(e.data["text"] for e in events if e.type == "message.delta")
        assert streamed == run["output"]
        stored = await kernel.store.read(repo.session_messages, session, include_rolled_back=True)
        assert [(m.role, m.content) for m in stored] == [("user", words), ("assistant", run["output"])]
        # The session is free again.
        follow = await kernel.submit(session, "next")
        assert follow.disposition is Disposition.STARTED


async def test_soft_cancel_at_a_step_boundary(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "/steps 5 100")
        await wait_event(kernel, session, "tool.started", run_id=accepted.run_id)
        await kernel.cancel(accepted.run_id, CancelMode.SOFT)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled"
        events = await run_events(kernel, accepted.run_id)
        # The tool already running finishes; no further step (model call or tool) begins.
        assert [e.type for e in events if e.type.startswith("tool.")] == ["tool.started", "tool.completed"]
        assert events[-1].type == "run.cancelled"


async def test_soft_cancel_of_a_queued_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, call = await park(kernel, session)
        doomed = await kernel.submit(session, "never runs")
        after = await kernel.submit(session, "runs anyway")
        status = await kernel.cancel(doomed.run_id, CancelMode.SOFT)
        assert status is RunStatus.CANCELLED
        run = await get_run(kernel, doomed.run_id)
        assert run["status"] == "cancelled" and run["started_at"] is None and run["output"] is None
        assert [i.status for i in await inputs_of(kernel, doomed.run_id)] == ["cancelled"]
        await kernel.decide(blocker, call, Decision.APPROVE)
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: runs anyway"
        types = [e.type for e in await session_events(kernel, session) if e.run_id == doomed.run_id]
        assert types == ["run.queued", "run.cancelled"]
        with pytest.raises(Conflict):
            await kernel.cancel(doomed.run_id, CancelMode.SOFT)


async def test_hard_cancel_of_a_queued_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        blocker, _ = await park(kernel, session)
        doomed = await kernel.submit(session, "never runs")
        await kernel.cancel(doomed.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, doomed.run_id))["status"] == "cancelled"
        assert (await get_run(kernel, blocker))["status"] == "waiting"


async def test_hard_cancel_mid_tool_ends_within_100ms(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, LONG_WAIT)
        await wait_event(kernel, session, "tool.started", run_id=accepted.run_id)
        elapsed = await time_hard_cancel(kernel, accepted.run_id)
        assert elapsed < 0.1, f"hard cancel took {elapsed * 1000:.0f} ms"
        terminal = (await run_events(kernel, accepted.run_id))[-1]
        assert terminal.type == "run.cancelled"
        assert "tool.completed" not in [e.type for e in await run_events(kernel, accepted.run_id)]
        run = await get_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled" and run["error"]["code"] == "cancelled"
        assert kernel.run_handle(accepted.run_id) is None
        assert (await wait_run(kernel, (await kernel.submit(session, "after")).run_id))["status"] == "completed"


async def test_hard_cancel_during_a_slow_model_call(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "/sleep 30")
        await wait_event(kernel, session, "run.started", run_id=accepted.run_id)
        assert await time_hard_cancel(kernel, accepted.run_id) < 0.1
        assert (await wait_run(kernel, accepted.run_id))["status"] == "cancelled"


async def test_cancelling_an_ended_run_is_a_conflict(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "done soon")
        await wait_run(kernel, accepted.run_id)
        for mode in CancelMode:
            with pytest.raises(Conflict):
                await kernel.cancel(accepted.run_id, mode)
        assert (await get_run(kernel, accepted.run_id))["status"] == "completed"


async def test_cancelling_an_unknown_run_is_not_found(kernel: Kernel) -> None:
    async with asyncio.timeout(5):
        for mode in CancelMode:
            with pytest.raises(NotFound):
                await kernel.cancel("run_does_not_exist", mode)


@pytest.mark.parametrize("mode", list(CancelMode))
async def test_cancel_of_a_parked_run(kernel: Kernel, mode: CancelMode) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        parked, call = await park(kernel, session)
        queued = await kernel.submit(session, "next in line")
        await kernel.cancel(parked, mode)
        run = await wait_run(kernel, parked)
        assert run["status"] == "cancelled"
        # The decision arrives too late: the run is gone.
        with pytest.raises(Conflict):
            await kernel.decide(parked, call, Decision.APPROVE)
        assert (await wait_run(kernel, queued.run_id))["status"] == "completed"
        types = [e.type for e in await session_events(kernel, session) if e.run_id == parked]
        assert "tool.started" not in types
        assert types[-1] == "run.cancelled"


async def test_interrupt_grace_expiry_escalates_to_hard(kernel: Kernel) -> None:
    """A run stuck in a tool never reaches a boundary: after the grace period it is cut off."""
    async with asyncio.timeout(10):
        grace = kernel.config.interrupt_grace_s
        session = await new_session(kernel)
        stuck = await kernel.submit(session, LONG_WAIT)
        await wait_event(kernel, session, "tool.started", run_id=stuck.run_id)
        handle = kernel.run_handle(stuck.run_id)
        assert handle is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        interrupt = await kernel.submit(session, "take over", mode=Mode.INTERRUPT)
        await handle.finished.wait()
        elapsed = loop.time() - began
        assert grace - 0.01 <= elapsed < grace + 0.2, f"ended after {elapsed:.3f} s (grace {grace} s)"
        run = await wait_run(kernel, stuck.run_id)
        assert run["status"] == "cancelled"
        assert run["error"]["message"] == "interrupted by a newer message"
        events = await run_events(kernel, stuck.run_id)
        assert "tool.completed" not in [e.type for e in events]  # the tool was cut off, not finished
        # (Not asserting its output: the cut-off run's unanswered tool call stays in the
        # context, and the demo model still follows that run's "/tool" directive.)
        next_run = await wait_run(kernel, interrupt.run_id)
        assert next_run["status"] == "completed"
        started = next(e for e in await run_events(kernel, interrupt.run_id) if e.type == "run.started")
        assert started.data["input_ids"] == [interrupt.input_id]
        assert started.seq > events[-1].seq


async def test_soft_cancel_then_hard_cancel(kernel: Kernel) -> None:
    """A soft cancel that cannot take effect (stuck tool) can be upgraded to hard."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        stuck = await kernel.submit(session, LONG_WAIT)
        await wait_event(kernel, session, "tool.started", run_id=stuck.run_id)
        assert await kernel.cancel(stuck.run_id, CancelMode.SOFT) is RunStatus.RUNNING
        assert (await get_run(kernel, stuck.run_id))["status"] == "running"
        assert await time_hard_cancel(kernel, stuck.run_id) < 0.1
        assert (await wait_run(kernel, stuck.run_id))["status"] == "cancelled"
