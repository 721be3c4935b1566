"""Approvals: per-tool policy (auto/ask/deny), per-run policy (continue/pause), parking
in ``waiting`` while holding nothing, and resuming, also after a restart."""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import Conflict, NotFound
from corral.kernel import Kernel
from corral.specs import AgentPolicy, AgentSpec
from corral.store import Event, repo
from corral.types import Approval, CancelMode, Decision, ExecPolicy, Mode
from tests.helpers import GATED, KernelHarness, agent_session, get_run, new_session, run_events, wait_event, wait_run

WAIT_1 = '/tool wait {"ms": 1}'


async def parked_calls(kernel: Kernel, session: str, run_id: str, count: int = 1) -> list[Event]:
    """Wait until the run parks; returns its approval requests."""
    waiting = await wait_event(kernel, session, "run.waiting", run_id=run_id)
    requests = [e for e in await run_events_so_far(kernel, session, run_id) if e.type == "approval.requested"]
    assert len(requests) == count
    assert waiting.data["pending"] == [e.data["call_id"] for e in requests]
    return requests


async def run_events_so_far(kernel: Kernel, session: str, run_id: str) -> list[Event]:
    return await kernel.store.read(repo.events_after, session, 0, run_id=run_id)


async def approvals(kernel: Kernel, run_id: str) -> list[tuple[str, str]]:
    return [(a.tool, a.status) for a in await kernel.store.read(repo.approvals_of_run, run_id)]


async def test_ask_parks_the_run_until_approved(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        accepted = await kernel.submit(session, WAIT_1)
        [request] = await parked_calls(kernel, session, accepted.run_id)
        assert request.data["tool"] == "wait" and request.data["arguments"] == {"ms": 1}
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        assert await approvals(kernel, accepted.run_id) == [("wait", "pending")]
        types = [e.type for e in await run_events_so_far(kernel, session, accepted.run_id)]
        assert "tool.started" not in types, "an `ask` tool must not run before the decision"
        await kernel.decide(accepted.run_id, request.data["call_id"], Decision.APPROVE)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed"
        assert run["output"] == "tool results: waited 1 ms"
        assert await approvals(kernel, accepted.run_id) == [("wait", "approved")]
        types = [e.type for e in await run_events(kernel, accepted.run_id)]
        assert types == ["run.queued", "run.started", "message.completed", "approval.requested", "run.waiting",
                         "approval.resolved", "tool.started", "tool.completed", "message.delta",
                         "message.completed", "run.completed"]


async def test_deny_gives_the_model_a_tool_error(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        accepted = await kernel.submit(session, WAIT_1)
        [request] = await parked_calls(kernel, session, accepted.run_id)
        await kernel.decide(accepted.run_id, request.data["call_id"], Decision.DENY)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed"
        assert run["output"] == "tool results: error: the call to wait was denied by a human"
        events = await run_events(kernel, accepted.run_id)
        assert "tool.started" not in [e.type for e in events]
        [result] = [e for e in events if e.type == "tool.completed"]
        assert result.data["is_error"] and "denied" in result.data["result"]
        resolved = next(e for e in events if e.type == "approval.resolved")
        assert resolved.data == {"call_id": request.data["call_id"], "decision": "deny"}
        assert await approvals(kernel, accepted.run_id) == [("wait", "denied")]


async def test_pause_policy_asks_for_every_call(kernel: Kernel) -> None:
    """`echo` is `auto` for the assistant, but a `pause` run asks anyway, per call."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, '/tool echo {"text": "one"}\n/tool echo {"text": "two"}',
                                       policy=ExecPolicy.PAUSE)
        first, second = await parked_calls(kernel, session, accepted.run_id, count=2)
        assert [first.data["tool"], second.data["tool"]] == ["echo", "echo"]
        await kernel.decide(accepted.run_id, second.data["call_id"], Decision.APPROVE)
        # One decision out of two: still parked, nothing ran.
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        with pytest.raises(NotFound):  # already decided
            await kernel.decide(accepted.run_id, second.data["call_id"], Decision.DENY)
        await kernel.decide(accepted.run_id, first.data["call_id"], Decision.APPROVE)
        run = await wait_run(kernel, accepted.run_id)
        assert run["output"] == "tool results: one; two"
        # The same message under the default policy runs straight through.
        plain = await kernel.submit(session, '/tool echo {"text": "three"}')
        run = await wait_run(kernel, plain.run_id)
        assert run["output"] == "tool results: three"
        assert "approval.requested" not in [e.type for e in await run_events(kernel, plain.run_id)]


async def test_pause_policy_asks_again_at_every_step(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "/steps 2 1", policy=ExecPolicy.PAUSE)
        after = 0
        for _ in range(2):
            waiting = await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id, after=after)
            after = waiting.seq
            [call_id] = waiting.data["pending"]
            await kernel.decide(accepted.run_id, call_id, Decision.APPROVE)
        run = await wait_run(kernel, accepted.run_id)
        assert run["output"] == "done 2 steps; steering seen: []"


async def test_deny_policy_never_runs_the_tool(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        refuser = AgentSpec(name="refuser", policy=AgentPolicy(approvals={"wait": Approval.DENY}))
        session = await agent_session(kernel, refuser)
        for policy in ExecPolicy:  # `pause` asks for everything, except what the policy denies
            accepted = await kernel.submit(session, WAIT_1, policy=policy)
            run = await wait_run(kernel, accepted.run_id)
            assert run["status"] == "completed"
            assert run["output"] == "tool results: error: the policy denies the tool wait"
            types = [e.type for e in await run_events(kernel, accepted.run_id)]
            assert "tool.started" not in types
            assert "approval.requested" not in types and "run.waiting" not in types
            assert await approvals(kernel, accepted.run_id) == []


async def test_wildcard_policy(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        spec = AgentSpec(name="careful", policy=AgentPolicy(approvals={"*": Approval.ASK, "echo": Approval.AUTO}))
        session = await agent_session(kernel, spec)
        echo = await kernel.submit(session, '/tool echo {"text": "free"}')
        assert (await wait_run(kernel, echo.run_id))["output"] == "tool results: free"
        wait = await kernel.submit(session, WAIT_1)
        [request] = await parked_calls(kernel, session, wait.run_id)
        await kernel.decide(wait.run_id, request.data["call_id"], Decision.APPROVE)
        assert (await wait_run(kernel, wait.run_id))["status"] == "completed"


async def test_waiting_across_a_restart(harness: KernelHarness, kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, GATED)
        accepted = await kernel.submit(session, WAIT_1)
        [request] = await parked_calls(kernel, session, accepted.run_id)
        steer = await kernel.submit(session, "remember me", mode=Mode.STEER)
        queued = await kernel.submit(session, "after the restart")
        await harness.stop()
        kernel = await harness.start()
        run = await get_run(kernel, accepted.run_id)
        assert run["status"] == "waiting", "a parked run keeps waiting over a restart"
        assert (await get_run(kernel, queued.run_id))["status"] == "queued"
        assert kernel.session_view(session)["active_run_id"] == accepted.run_id
        types = [e.type for e in await run_events_so_far(kernel, session, accepted.run_id)]
        assert "run.interrupted" not in types
        with pytest.raises(NotFound):
            await kernel.decide(accepted.run_id, "call_unknown", Decision.APPROVE)
        await kernel.decide(accepted.run_id, request.data["call_id"], Decision.APPROVE)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed"
        assert run["output"] == "tool results: waited 1 ms"
        # The steer accepted before the restart was delivered at the resumed run's boundary.
        steered = [e for e in await run_events(kernel, accepted.run_id) if e.type == "run.steered"]
        assert [e.data["input_id"] for e in steered] == [steer.input_id]
        assert (await wait_run(kernel, queued.run_id))["output"] == "echo: after the restart"


async def test_decisions_for_unknown_calls_and_runs(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await agent_session(kernel, GATED)
        accepted = await kernel.submit(session, WAIT_1)
        [request] = await parked_calls(kernel, session, accepted.run_id)
        with pytest.raises(NotFound):
            await kernel.decide(accepted.run_id, "call_nope", Decision.APPROVE)
        with pytest.raises(NotFound):
            await kernel.decide("run_nope", request.data["call_id"], Decision.APPROVE)
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        await kernel.decide(accepted.run_id, request.data["call_id"], Decision.APPROVE)
        await wait_run(kernel, accepted.run_id)
        with pytest.raises(Conflict):  # the run has ended
            await kernel.decide(accepted.run_id, request.data["call_id"], Decision.APPROVE)
        # A running run that is not waiting has no pending approvals.
        other = await new_session(kernel)
        busy = await kernel.submit(other, '/tool wait {"ms": 30000}')
        await wait_event(kernel, other, "tool.started", run_id=busy.run_id)
        with pytest.raises(NotFound):
            await kernel.decide(busy.run_id, "call_x", Decision.APPROVE)
        await kernel.cancel(busy.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, busy.run_id))["status"] == "cancelled"


async def test_a_waiting_run_holds_no_model_slot(kernel: Kernel) -> None:
    """Invariant 8: with one model slot, a parked run does not block another session."""
    async with asyncio.timeout(10):
        spec = GATED.model_copy(update={"name": "one-slot", "provider_options": {"max_concurrent_calls": 1}})
        parked_session = await agent_session(kernel, spec)
        parked = await kernel.submit(parked_session, WAIT_1)
        [request] = await parked_calls(kernel, parked_session, parked.run_id)
        others = [await new_session(kernel, spec.name) for _ in range(3)]
        runs = [await kernel.submit(s, f"hello {n}") for n, s in enumerate(others)]
        outputs = [(await wait_run(kernel, r.run_id))["output"] for r in runs]
        assert outputs == ["echo: hello 0", "echo: hello 1", "echo: hello 2"]
        assert (await get_run(kernel, parked.run_id))["status"] == "waiting"
        await kernel.decide(parked.run_id, request.data["call_id"], Decision.APPROVE)
        assert (await wait_run(kernel, parked.run_id))["status"] == "completed"
