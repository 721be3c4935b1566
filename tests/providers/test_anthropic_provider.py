"""Provider ``anthropic`` through the official SDK against a scripted Messages API server on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral.kernel import Kernel
from corral.specs import AgentSpec
from corral.types import CancelMode
from tests.helpers import new_session, ready_agent, wait_event, wait_run
from tests.providers.upstream import Status, Stream, upstream

LIMIT = 30


def message_start(input_tokens: int = 11) -> tuple[str, dict[str, Any]]:
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})


def text_reply(*pieces: str, output_tokens: int = 5) -> list[Any]:
    events: list[Any] = [message_start(), ("content_block_start", {
        "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}}) for piece in pieces]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}), *_end("end_turn", output_tokens)]
    return events


def tool_use_reply(use_id: str, name: str, fragments: list[str]) -> list[Any]:
    events: list[Any] = [message_start(), ("content_block_start", {
        "type": "content_block_start", "index": 0,
        "content_block": {"type": "tool_use", "id": use_id, "name": name, "input": {}}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "input_json_delta", "partial_json": f}}) for f in fragments]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}), *_end("tool_use", 9)]
    return events


def _end(reason: str, output_tokens: int) -> list[Any]:
    return [("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
                               "usage": {"output_tokens": output_tokens}}),
            ("message_stop", {"type": "message_stop"})]


async def anthropic_agent(kernel: Kernel, name: str, base_url: str, **options: Any) -> None:
    spec = AgentSpec(name=name, provider="anthropic", model="claude-test", system_prompt="be kind",
                     provider_options={"base_url": base_url, "api_key": "sk-ant-test", "retry_base_s": 0.01,
                                       **options}, tools=["echo"])
    await ready_agent(kernel, spec)


async def test_text_and_a_tool_round_trip(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Stream(tool_use_reply("toolu_1", "echo", ['{"te', 'xt": "fr', 'om claude"}']), done=False),
        Stream(text_reply("the tool said ", "from claude"), done=False),
    ) as up:
        await anthropic_agent(kernel, "claude", up.base)
        session = await new_session(kernel, "claude")
        accepted = await kernel.submit(session, "please use echo")
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed", run
        assert run["output"] == "the tool said from claude"
        assert run["usage"] == {"input_tokens": 22, "output_tokens": 14}
        first, second = (r.body for r in up.requests)
        headers = up.requests[0].headers  # the SDK sends the key as x-api-key or as a bearer token
        assert "sk-ant-test" in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
        assert first["system"] == "be kind" and first["stream"] is True and first["max_tokens"] == 4096
        assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "please use echo"}]}]
        assert first["tools"][0]["name"] == "echo" and "input_schema" in first["tools"][0]
        assert second["messages"][1:] == [
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {"text": "from claude"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "from claude"}]},
        ]


async def test_overloaded_is_retried_and_a_bad_request_is_not(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Status(529, {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}},
               {"retry-after": "0.2"}),
        Stream(text_reply("recovered"), done=False),
        Status(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "no good"}}),
    ) as up:
        await anthropic_agent(kernel, "claude", up.base)
        session = await new_session(kernel, "claude")
        first = await wait_run(kernel, (await kernel.submit(session, "hi")).run_id)
        assert first["output"] == "recovered"
        assert up.requests[1].at - up.requests[0].at >= 0.2
        second = await wait_run(kernel, (await kernel.submit(session, "again")).run_id)
        assert second["status"] == "failed" and "400" in second["error"]["message"]
        assert len(up.requests) == 3


async def test_a_reply_without_message_stop_is_an_error(kernel: Kernel) -> None:
    truncated = text_reply("cut")[:-1]  # a clean end of the body, but no message_stop
    async with asyncio.timeout(LIMIT), upstream(Stream(truncated, done=False)) as up:
        await anthropic_agent(kernel, "claude", up.base, max_retries=0)
        session = await new_session(kernel, "claude")
        run = await wait_run(kernel, (await kernel.submit(session, "hi")).run_id)
        assert run["status"] == "failed" and "message_stop" in run["error"]["message"]
        assert len(up.requests) == 1


async def test_hard_cancel_closes_the_stream_at_once(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Stream(text_reply("a ", "b"), hang_after=3, done=False)) as up:
        await anthropic_agent(kernel, "claude", up.base)
        session = await new_session(kernel, "claude")
        accepted = await kernel.submit(session, "hi")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        began = time.monotonic()
        await kernel.cancel(accepted.run_id, CancelMode.HARD)
        await asyncio.wait_for(up.disconnected.wait(), 5)
        seen = up.requests[0].disconnected_at
        assert seen is not None and seen - began < 0.1
