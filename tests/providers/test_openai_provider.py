"""Provider ``openai`` against real servers on loopback: Corral's own endpoint, and a scripted one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from corral.kernel import Kernel
from corral.settings import Settings
from corral.specs import AgentSpec
from corral.types import AgentState, CancelMode, EventType
from tests.helpers import http_server, new_session, ready_agent, run_events, wait_event, wait_run
from tests.providers.upstream import Silence, Status, Stream, text_chunks, tool_call_chunks, upstream

LIMIT = 30
FAST_RETRY = {"retry_base_s": 0.01, "retry_max_s": 0.05}


async def openai_agent(kernel: Kernel, name: str, base_url: str, model: str = "m", **options: Any) -> None:
    spec = AgentSpec(name=name, provider="openai", model=model,
                     provider_options={"base_url": base_url, **options}, tools=["echo", "wait"])
    await ready_agent(kernel, spec)


async def ask(kernel: Kernel, agent: str, text: str) -> dict[str, Any]:
    session = await new_session(kernel, agent)
    accepted = await kernel.submit(session, text)
    return await wait_run(kernel, accepted.run_id)


async def test_relay_through_corrals_own_endpoint(settings: Settings) -> None:
    """Both ends real: an `openai` agent whose upstream is this server's /v1/chat/completions."""
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel):
        await kernel.agents.create(AgentSpec(name="talker", provider_options={"token_ms": 2}))
        await openai_agent(kernel, "relay", f"{base}/v1", model="talker")
        session = await new_session(kernel, "relay")
        accepted = await kernel.submit(session, "one two three")
        events = await run_events(kernel, accepted.run_id)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed", run
        assert run["output"] == "echo: one two three"
        deltas = [e.data["text"] for e in events if e.type == EventType.MESSAGE_DELTA]
        assert len(deltas) == 4 and "".join(deltas) == "echo: one two three"  # streamed through, word by word
        assert run["usage"] == {"input_tokens": 3, "output_tokens": 4}


async def test_tool_calls_stream_in_fragments_and_results_go_back(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Stream(tool_call_chunks("call_1", "echo", '{"text": "fragmented arguments"}')),
        Stream(text_chunks("the tool said ", "fragmented arguments")),
    ) as up:
        await openai_agent(kernel, "tooled", up.base)
        run = await ask(kernel, "tooled", "use the tool")
        assert run["status"] == "completed", run
        assert run["output"] == "the tool said fragmented arguments"
        first, second = (r.body for r in up.requests)
        assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
        assert {t["function"]["name"] for t in first["tools"]} == {"echo", "wait"}
        assert first["messages"] == [{"role": "user", "content": "use the tool"}]
        assert second["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "echo", "arguments": '{"text": "fragmented arguments"}'}}]}
        assert second["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "fragmented arguments"}
        assert run["usage"] == {"input_tokens": 14, "output_tokens": 6}  # both calls counted


async def test_429_is_retried_after_retry_after(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Status(429, {"error": {"message": "slow down"}}, {"retry-after": "0.3"}),
        Stream(text_chunks("fine now")),
    ) as up:
        await openai_agent(kernel, "patient", up.base, retry_base_s=0.01, retry_max_s=5)
        run = await ask(kernel, "patient", "hi")
        assert run["status"] == "completed" and run["output"] == "fine now"
        assert len(up.requests) == 2
        assert up.requests[1].at - up.requests[0].at >= 0.3  # the server's hint, not the tiny backoff


async def test_5xx_is_retried_with_backoff_then_gives_up(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Status(500, {"error": {"message": "oops"}}), Status(503, {"error": {"message": "busy"}}),
        Stream(text_chunks("third time lucky")),
    ) as up:
        await openai_agent(kernel, "retrying", up.base, **FAST_RETRY)
        run = await ask(kernel, "retrying", "hi")
        assert run["output"] == "third time lucky" and len(up.requests) == 3
    async with asyncio.timeout(LIMIT), upstream(*[Status(500, {"error": {"message": "down"}})] * 5) as up:
        await openai_agent(kernel, "doomed", up.base, max_retries=2, **FAST_RETRY)
        run = await ask(kernel, "doomed", "hi")
        assert run["status"] == "failed"
        assert run["error"]["code"] == "provider_unavailable" and "HTTP 500" in run["error"]["message"]
        assert len(up.requests) == 3  # one try and two retries


async def test_a_client_error_is_not_retried_and_the_key_stays_secret(kernel: Kernel,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test-very-secret-123")
    async with asyncio.timeout(LIMIT), upstream(Status(401, {"error": {"message": "bad key"}})) as up:
        await openai_agent(kernel, "locked", up.base, api_key_env="TEST_UPSTREAM_KEY", **FAST_RETRY)
        run = await ask(kernel, "locked", "hi")
        assert run["status"] == "failed" and run["error"]["code"] == "provider_error"
        assert "401" in run["error"]["message"] and "sk-test" not in run["error"]["message"]
        assert len(up.requests) == 1
        assert up.requests[0].headers["authorization"] == "Bearer sk-test-very-secret-123"


async def test_a_stream_cut_mid_reply_fails_the_run_without_a_retry(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Stream(text_chunks("half ", "a reply"), cut_after=2)) as up:
        await openai_agent(kernel, "cut", up.base, **FAST_RETRY)
        run = await ask(kernel, "cut", "hi")
        # Text had already streamed to observers: a retry would show it twice.
        assert run["status"] == "failed" and "connection failed" in run["error"]["message"]
        assert len(up.requests) == 1


async def test_a_stream_cut_before_any_text_is_retried(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Stream(text_chunks("never seen"), cut_after=0), Stream(text_chunks("whole"), done=False),
    ) as up:
        await openai_agent(kernel, "again", up.base, **FAST_RETRY)
        run = await ask(kernel, "again", "hi")
        assert run["status"] == "completed" and run["output"] == "whole"
        assert len(up.requests) == 2


async def test_a_hung_upstream_times_out(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Silence()) as up:
        await openai_agent(kernel, "hung", up.base, timeout_s=0.3, max_retries=0)
        began = time.monotonic()
        run = await ask(kernel, "hung", "hi")
        assert run["status"] == "failed" and "Timeout" in run["error"]["message"]
        assert 0.3 <= time.monotonic() - began < 5
        await asyncio.wait_for(up.disconnected.wait(), 5)  # and the connection was let go


async def test_hard_cancel_mid_stream_closes_the_upstream_connection_within_100_ms(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Stream(text_chunks("first ", "never"), hang_after=2)) as up:
        await openai_agent(kernel, "cancelled", up.base)
        session = await new_session(kernel, "cancelled")
        accepted = await kernel.submit(session, "hi")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        began = time.monotonic()
        await kernel.cancel(accepted.run_id, CancelMode.HARD)
        await asyncio.wait_for(up.disconnected.wait(), 5)
        seen = up.requests[0].disconnected_at
        assert seen is not None and seen - began < 0.1, seen - began
        assert (await wait_run(kernel, accepted.run_id))["status"] == "cancelled"


async def test_fallback_answers_when_the_provider_fails_before_speaking(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Status(500, {"error": {"message": "down"}})) as up:
        spec = AgentSpec(name="resilient", provider="openai", model="m",
                         provider_options={"base_url": up.base, "max_retries": 0},
                         fallbacks=[{"provider": "demo"}])  # type: ignore[list-item]
        await kernel.agents.create(spec)
        await kernel.agents.wait_ready("resilient")
        run = await ask(kernel, "resilient", "hi")
        assert run["status"] == "completed" and run["output"] == "echo: hi"
        assert len(up.requests) == 1


async def test_configuration_errors_are_clear(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.errors import InvalidInput

    with pytest.raises(InvalidInput, match="needs a model"):
        await kernel.agents.create(AgentSpec(name="nomodel", provider="openai"))
    with pytest.raises(InvalidInput, match="timeout_s"):
        await kernel.agents.create(AgentSpec(name="bad", provider="openai", model="m",
                                             provider_options={"timeout_s": -1}))
    with pytest.raises(InvalidInput, match="unknown provider"):
        await kernel.agents.create(AgentSpec(name="what", provider="palm", model="m"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = await kernel.agents.create(AgentSpec(name="keyless", provider="openai", model="gpt"))
    assert agent.state is AgentState.STARTING  # created at once; the start fails in the background
    with pytest.raises(Exception, match="OPENAI_API_KEY"):
        await kernel.agents.wait_ready("keyless")
    assert kernel.agents.get("keyless").state is AgentState.FAILED


async def test_a_call_cut_off_by_a_cancel_gets_a_result_before_the_next_turn(kernel: Kernel) -> None:
    """Model APIs reject a tool call without a result: the next run's context closes it."""
    async with asyncio.timeout(LIMIT), upstream(
        Stream(tool_call_chunks("call_9", "wait", '{"ms": 60000}')), Stream(text_chunks("fresh start")),
    ) as up:
        await openai_agent(kernel, "cut-off", up.base)
        session = await new_session(kernel, "cut-off")
        first = await kernel.submit(session, "wait a minute")
        await wait_event(kernel, session, "tool.started", run_id=first.run_id)
        await kernel.cancel(first.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, first.run_id))["status"] == "cancelled"
        second = await wait_run(kernel, (await kernel.submit(session, "never mind")).run_id)
        assert second["output"] == "fresh start"
        sent = up.requests[1].body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
        assert sent[2]["tool_call_id"] == "call_9" and "no result" in sent[2]["content"]
