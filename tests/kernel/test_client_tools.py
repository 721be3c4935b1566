"""Client tools at the kernel: a call of a tool the client's request brought parks the run in
``waiting`` holding nothing (like an approval), the client's results resume that same run, and
the wait survives a restart with its tools and its pending calls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from corral.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from corral.kernel import Kernel, KernelConfig
from corral.providers.base import ModelOptions, ResponseFormat, ToolChoice, ToolSpec
from corral.settings import default_agent
from corral.specs import AgentPolicy, AgentSpec
from corral.store import Event, repo
from corral.store import tables as t
from corral.types import Approval, Decision, Mode, RunStatus
from tests.faults import FlakyStore
from tests.helpers import (
    KernelHarness,
    agent_session,
    get_run,
    new_session,
    run_events,
    select_all,
    sqlite_url,
    wait_event,
    wait_run,
)

WEATHER = ToolSpec("get_weather", "The weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
OPTIONS = ModelOptions((WEATHER,))
ASK_WEATHER = '/tool get_weather {"city": "Paris"}'


async def parked(kernel: Kernel, session: str, run_id: str) -> Event:
    """The run's ``run.waiting`` for its client's results, once its task has let go of it (the task
    ends just after the event commits)."""
    waiting = await wait_event(kernel, session, "run.waiting", run_id=run_id)
    assert waiting.data.get("client_calls"), waiting.data
    handle = kernel.run_handle(run_id)
    if handle is not None and handle.task is not None:
        await asyncio.wait({handle.task})
    return waiting


async def test_a_client_tool_call_parks_the_run_and_the_results_resume_the_same_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
        waiting = await parked(kernel, session, accepted.run_id)
        [call] = waiting.data["client_calls"]
        assert (call["name"], call["arguments"]) == ("get_weather", {"city": "Paris"})
        assert waiting.data["pending"] == [call["id"]]
        handle = kernel.run_handle(accepted.run_id)
        assert handle is not None and handle.status is RunStatus.WAITING and handle.task is None
        assert set(handle.pending_client_calls) == {call["id"]}
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        [row] = await select_all(kernel.store, t.client_calls.select())
        assert (row.call_id, row.tool, row.answered_at) == (call["id"], "get_weather", None)

        answered = await kernel.answer_client_calls(accepted.run_id, {call["id"]: "sunny, 21 C"})
        assert (answered.run_id, answered.session_id, answered.pending) == (accepted.run_id, session, frozenset())
        run = await wait_run(kernel, accepted.run_id)
        assert (run["status"], run["output"]) == ("completed", "tool results: sunny, 21 C")
        events = await run_events(kernel, accepted.run_id)
        assert [e.type for e in events] == [
            "run.queued", "run.started", "message.completed", "tool.started", "run.waiting", "tool.completed",
            "message.delta", "message.completed", "run.completed"]
        started, completed = events[3], events[5]
        assert started.data == {"call_id": call["id"], "tool": "get_weather", "arguments": {"city": "Paris"},
                                "client": True}
        assert completed.data == {"call_id": call["id"], "tool": "get_weather", "result": "sunny, 21 C",
                                  "is_error": False, "client": True}
        assert completed.seq > answered.after >= waiting.seq  # the resumed run's events follow `after`
        [row] = await select_all(kernel.store, t.client_calls.select())
        assert row.answered_at is not None
        runs = await kernel.store.read(repo.list_runs, session_ids=[session], statuses=None, limit=10, offset=0)
        assert [r.id for r in runs] == [accepted.run_id]  # one run, resumed


async def test_a_run_waiting_for_its_client_holds_no_provider_slot(kernel: Kernel) -> None:
    """Invariant 8 for client tools: with the one model slot of its agent, other sessions run to the
    end while a run waits for its client's results."""
    async with asyncio.timeout(10):
        spec = AgentSpec(name="narrow", provider_options={"max_concurrent_calls": 1})
        session = await agent_session(kernel, spec)
        agent = kernel.agents.get("narrow")
        accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
        [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
        assert not agent.slot.locked()
        others = [await new_session(kernel, "narrow") for _ in range(3)]
        submitted = [await kernel.submit(s, f"hello {i}") for i, s in enumerate(others)]
        done = await asyncio.gather(*(wait_run(kernel, a.run_id) for a in submitted))
        assert [r["output"] for r in done] == ["echo: hello 0", "echo: hello 1", "echo: hello 2"]
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        await kernel.answer_client_calls(accepted.run_id, {call["id"]: "rain"})
        assert (await wait_run(kernel, accepted.run_id))["output"] == "tool results: rain"


async def test_the_wait_survives_a_restart_with_its_tools_and_its_pending_calls(db_url: str) -> None:
    """Stopped (or killed) while a run waits for its client: after recovery it still waits, for the
    same calls, and the run offers the same client tools when it resumes (its second step calls one
    again and parks again). On SQLite and Postgres."""
    async with asyncio.timeout(20):
        harness = KernelHarness(db_url, KernelConfig(shutdown_grace_s=1.0))
        kernel = await harness.start()
        session = await new_session(kernel)
        two_steps = ASK_WEATHER + '\n/next\n/tool get_weather {"city": "Oslo"}'
        accepted = await kernel.submit(session, two_steps, model_options=OPTIONS)
        [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
        await harness.stop()

        kernel = await harness.start()
        handle = kernel.run_handle(accepted.run_id)
        assert handle is not None and handle.status is RunStatus.WAITING and handle.task is None
        assert list(handle.pending_client_calls) == [call["id"]]
        assert handle.pending_client_calls[call["id"]].arguments == {"city": "Paris"}
        assert handle.slot.model_options == OPTIONS
        assert handle.client_timer is not None  # its wait still ends if nobody answers
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"

        answered = await kernel.answer_client_calls(accepted.run_id, {call["id"]: "sunny"})
        second = None
        async for event in kernel.hub.observe(kernel.store, session, after=answered.after, run_id=accepted.run_id):
            if event.type == "run.waiting":
                second = event
                break
        assert second is not None
        [call2] = second.data["client_calls"]
        assert call2["arguments"] == {"city": "Oslo"}
        await kernel.answer_client_calls(accepted.run_id, {call2["id"]: "snow"})
        run = await wait_run(kernel, accepted.run_id)
        assert (run["status"], run["output"]) == ("completed", "tool results: sunny; snow")
        await harness.stop()


async def test_agent_tools_of_the_same_step_run_and_the_client_calls_wait(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        content = '/tool echo {"text": "mine"}\n' + ASK_WEATHER
        accepted = await kernel.submit(session, content, model_options=OPTIONS)
        waiting = await parked(kernel, session, accepted.run_id)
        [call] = waiting.data["client_calls"]
        assert call["name"] == "get_weather" and waiting.data["pending"] == [call["id"]]
        await kernel.answer_client_calls(accepted.run_id, {call["id"]: "theirs"})
        run = await wait_run(kernel, accepted.run_id)
        assert run["output"] == "tool results: mine; theirs"


async def test_an_approval_and_a_client_call_in_one_step_both_hold_the_run(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        spec = AgentSpec(name="careful", policy=AgentPolicy(approvals={"wait": Approval.ASK}))
        session = await agent_session(kernel, spec)
        content = '/tool wait {"ms": 1}\n' + ASK_WEATHER
        accepted = await kernel.submit(session, content, model_options=OPTIONS)
        waiting = await parked(kernel, session, accepted.run_id)
        [client_call] = waiting.data["client_calls"]
        approval = await wait_event(kernel, session, "approval.requested", run_id=accepted.run_id)
        assert set(waiting.data["pending"]) == {client_call["id"], approval.data["call_id"]}
        await kernel.decide(accepted.run_id, approval.data["call_id"], Decision.APPROVE)
        handle = kernel.run_handle(accepted.run_id)
        assert handle is not None and handle.status is RunStatus.WAITING and handle.task is None  # still the client's
        await kernel.answer_client_calls(accepted.run_id, {client_call["id"]: "fog"})
        run = await wait_run(kernel, accepted.run_id)
        assert (run["status"], run["output"]) == ("completed", "tool results: fog; waited 1 ms")


async def test_results_are_checked_before_anything_is_recorded(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
        [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
        with pytest.raises(NotFound):
            await kernel.answer_client_calls(accepted.run_id, {"call_nobody": "x"})
        with pytest.raises(NotFound):
            await kernel.answer_client_calls("run_nobody", {call["id"]: "x"})
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        await kernel.answer_client_calls(accepted.run_id, {call["id"]: "ok"})
        await wait_run(kernel, accepted.run_id)
        with pytest.raises(Conflict):
            await kernel.answer_client_calls(accepted.run_id, {call["id"]: "again"})
        with pytest.raises(InvalidInput):
            await kernel.submit(session, ASK_WEATHER, mode=Mode.STEER, model_options=OPTIONS)


async def test_locate_finds_the_run_by_its_call_ids(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, ASK_WEATHER + '\n/tool get_weather {"city": "Rome"}',
                                       model_options=OPTIONS)
        calls = [c["id"] for c in (await parked(kernel, session, accepted.run_id)).data["client_calls"]]
        found = await kernel.client_tools.locate(calls, owner="local", agent="assistant")
        assert found is not None
        assert (found.run_id, found.session_id, found.status) == (accepted.run_id, session, RunStatus.WAITING)
        assert (found.pending, found.answered) == (frozenset(calls), frozenset())
        assert await kernel.client_tools.locate(calls, owner="someone else") is None
        assert await kernel.client_tools.locate(calls, agent="another") is None
        assert await kernel.client_tools.locate([calls[0], "call_unknown"]) is None
        await kernel.answer_client_calls(accepted.run_id, {calls[0]: "a"})
        found = await kernel.client_tools.locate(calls)
        assert found is not None and (found.pending, found.answered) == ({calls[1]}, {calls[0]})


async def test_a_client_that_never_answers_has_its_run_cancelled(tmp_path: Path) -> None:
    async with asyncio.timeout(10):
        harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(client_tools_timeout_s=0.2))
        kernel = await harness.start()
        try:
            session = await new_session(kernel)
            accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
            run = await wait_run(kernel, accepted.run_id)
            assert run["status"] == "cancelled"
            assert "no result of its tool calls" in run["error"]["message"]
            after = await kernel.submit(session, "next")  # the session moved on
            assert (await wait_run(kernel, after.run_id))["status"] == "completed"
        finally:
            await harness.stop()


async def test_abandon_cancels_the_waiting_run_so_a_new_message_runs(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
        await parked(kernel, session, accepted.run_id)
        assert kernel.client_tools.pending_in(session) is kernel.run_handle(accepted.run_id)
        await kernel.client_tools.abandon(accepted.run_id)
        run = await get_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled" and "without the results" in run["error"]["message"]
        assert kernel.client_tools.pending_in(session) is None
        after = await kernel.submit(session, "hello")
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: hello"


async def model_requests(kernel: Kernel, agent: str) -> list[Any]:
    """Record the requests the agent's provider is given from now on."""
    runtime = kernel.agents.get(agent)
    provider = runtime.provider
    assert provider is not None
    seen: list[Any] = []
    original = provider.stream

    def stream(request: Any) -> Any:
        seen.append(request)
        return original(request)

    provider.stream = stream  # type: ignore[method-assign]
    return seen


async def test_a_forced_tool_choice_binds_the_first_model_call_of_a_request_only(kernel: Kernel) -> None:
    """``required`` makes the demo call the client tool (with the smallest arguments its schema
    takes); after the results, the run's next call is back to ``auto``, so it answers."""
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        requests = await model_requests(kernel, "assistant")
        options = ModelOptions((WEATHER,), ToolChoice("required"))
        accepted = await kernel.submit(session, "what is the weather?", model_options=options)
        [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
        assert (call["name"], call["arguments"]) == ("get_weather", {"city": ""})
        await kernel.answer_client_calls(accepted.run_id, {call["id"]: "hail"})
        assert (await wait_run(kernel, accepted.run_id))["output"] == "tool results: hail"
        assert [r.tool_choice for r in requests] == [ToolChoice("required"), None]
        assert [s.name for s in requests[0].tools][:1] == ["get_weather"]  # the client's tools come first

        # Results that come with a request's options again (a new request): its choice binds that
        # request's first model call (the demo, with a result in hand, answers anyway).
        accepted = await kernel.submit(session, "and tomorrow?", model_options=options)
        [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
        await kernel.answer_client_calls(accepted.run_id, {call["id"]: "wind"}, model_options=options)
        assert (await wait_run(kernel, accepted.run_id))["output"] == "tool results: wind"
        assert [r.tool_choice for r in requests[2:]] == [ToolChoice("required"), ToolChoice("required")]


async def test_a_response_format_reaches_the_model_and_the_demo_answers_with_the_smallest_instance(
        kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer",
                                                                                       "minimum": 18}},
                  "required": ["name", "age"]}
        options = ModelOptions(response_format=ResponseFormat("json_schema", "person", schema, True))
        accepted = await kernel.submit(session, "who?", model_options=options)
        run = await wait_run(kernel, accepted.run_id)
        assert json.loads(run["output"]) == {"name": "", "age": 18}
        none = ModelOptions((WEATHER,), ToolChoice("none"))
        accepted = await kernel.submit(session, ASK_WEATHER, model_options=none)
        assert (await wait_run(kernel, accepted.run_id))["output"] == "echo: " + ASK_WEATHER


async def test_results_the_store_refuses_leave_the_calls_pending_to_send_again(tmp_path: Path) -> None:
    """The repair rule for the results' write: nothing was recorded, so the run still waits for the
    same calls and the client may send the results again."""
    async with asyncio.timeout(10):
        store = FlakyStore(sqlite_url(tmp_path))
        kernel = Kernel(store, KernelConfig(shutdown_grace_s=1.0), initial_agents=(default_agent(),))
        async with kernel.running():
            await kernel.agents.wait_ready("assistant")
            session = await new_session(kernel)
            accepted = await kernel.submit(session, ASK_WEATHER, model_options=OPTIONS)
            [call] = (await parked(kernel, session, accepted.run_id)).data["client_calls"]
            store.fail("record", times=1)
            with pytest.raises(StoreUnavailable):
                await kernel.answer_client_calls(accepted.run_id, {call["id"]: "lost"})
            handle = kernel.run_handle(accepted.run_id)
            assert handle is not None and list(handle.pending_client_calls) == [call["id"]]
            assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
            await kernel.answer_client_calls(accepted.run_id, {call["id"]: "kept"})
            assert (await wait_run(kernel, accepted.run_id))["output"] == "tool results: kept"
