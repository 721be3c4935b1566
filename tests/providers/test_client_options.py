"""What a client's request adds to a run (its own tools, tool_choice, response_format) reaches the real
providers: OpenAI's chat completions and Anthropic's Messages API, each in its own words; a call of a
client tool parks the run, and the client's result goes back to the model as a tool result."""

from __future__ import annotations

import asyncio
from typing import Any

from corral.kernel import Kernel
from corral.providers.base import ModelOptions, ResponseFormat, ToolChoice, ToolSpec
from corral.settings import Settings
from corral.store import repo
from tests.helpers import http_server, new_session, wait_event, wait_run
from tests.providers.test_anthropic_provider import anthropic_agent, text_reply, tool_use_reply
from tests.providers.test_openai_provider import openai_agent
from tests.providers.upstream import Stream, text_chunks, tool_call_chunks, upstream

LIMIT = 30
LOOKUP = ToolSpec("lookup", "Look a word up", {"type": "object", "properties": {"word": {"type": "string"}},
                                               "required": ["word"]})
SCHEMA = {"type": "object", "properties": {"meaning": {"type": "string"}}, "required": ["meaning"],
          "additionalProperties": False}


async def park_and_answer(kernel: Kernel, agent: str, options: ModelOptions, result: str) -> dict[str, Any]:
    """A run of ``agent`` with ``options`` whose model calls the client tool: answered with ``result``."""
    session = await new_session(kernel, agent)
    accepted = await kernel.submit(session, '/tool lookup {"word": "corral"}', model_options=options)
    waiting = await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id)
    [call] = waiting.data["client_calls"]
    assert (call["name"], call["arguments"]) == ("lookup", {"word": "corral"})
    await kernel.answer_client_calls(accepted.run_id, {call["id"]: result})
    return await wait_run(kernel, accepted.run_id)


async def test_openai_gets_the_client_tools_tool_choice_and_response_format(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Stream(tool_call_chunks("call_x", "lookup", '{"word": "corral"}')),
        Stream(text_chunks('{"meaning": "a pen"}')),
    ) as up:
        await openai_agent(kernel, "gpt", up.base)
        options = ModelOptions((LOOKUP,), ToolChoice("function", "lookup"),
                               ResponseFormat("json_schema", "meaning", SCHEMA, strict=True))
        run = await park_and_answer(kernel, "gpt", options, "an enclosure for livestock")
        assert (run["status"], run["output"]) == ("completed", '{"meaning": "a pen"}')
        first, second = (r.body for r in up.requests)
        assert [t["function"]["name"] for t in first["tools"]] == ["lookup", "echo", "wait"]
        assert first["tools"][0]["function"]["parameters"] == LOOKUP.parameters
        assert first["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
        assert first["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "meaning", "schema": SCHEMA, "strict": True}}
        assert "tool_choice" not in second  # a forced tool binds the request's first model call only
        assert second["response_format"] == first["response_format"]
        assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_x",
                                          "content": "an enclosure for livestock"}


async def test_openai_gets_required_none_and_json_object(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(Stream(text_chunks("{}")), Stream(text_chunks("plain"))) as up:
        await openai_agent(kernel, "gpt", up.base)
        session = await new_session(kernel, "gpt")
        for options in (ModelOptions((LOOKUP,), ToolChoice("required"), ResponseFormat("json_object")),
                        ModelOptions((LOOKUP,), ToolChoice("none"))):
            accepted = await kernel.submit(session, "hi", model_options=options)
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
        first, second = (r.body for r in up.requests)
        assert (first["tool_choice"], first["response_format"]) == ("required", {"type": "json_object"})
        assert second["tool_choice"] == "none" and "response_format" not in second


async def test_anthropic_gets_the_client_tools_tool_choice_and_the_schema(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT), upstream(
        Stream(tool_use_reply("toolu_x", "lookup", ['{"word": ', '"corral"}']), done=False),
        Stream(text_reply('{"meaning": "a pen"}'), done=False),
    ) as up:
        await anthropic_agent(kernel, "claude", up.base)
        options = ModelOptions((LOOKUP,), ToolChoice("required"), ResponseFormat("json_schema", "m", SCHEMA))
        run = await park_and_answer(kernel, "claude", options, "an enclosure")
        assert (run["status"], run["output"]) == ("completed", '{"meaning": "a pen"}')
        first, second = (r.body for r in up.requests)
        assert [t["name"] for t in first["tools"]] == ["lookup", "echo"]
        assert first["tool_choice"] == {"type": "any"}
        assert first["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
        assert "tool_choice" not in second and second["output_config"] == first["output_config"]
        assert second["messages"][-1] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "an enclosure"}]}


async def test_client_tools_relay_through_corrals_own_endpoint(settings: Settings) -> None:
    """Both ends real: an ``openai`` agent whose upstream is this server's chat completions, on the
    demo model. The client tool goes up as a request's tool, the demo's call of it parks both runs,
    and the client's result goes up as a ``role: tool`` message that resumes the upstream run."""
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel):
        await openai_agent(kernel, "relay", f"{base}/v1", model="assistant")
        run = await park_and_answer(kernel, "relay", ModelOptions((LOOKUP,)), "a pen for animals")
        assert (run["status"], run["output"]) == ("completed", "tool results: a pen for animals")
        upstream_runs = [r for r in await kernel.store.read(repo.list_runs, session_ids=None, statuses=None,
                                                              limit=10, offset=0) if r.id != run["id"]]
        assert [(r.status, r.output) for r in upstream_runs] == [("completed", "tool results: a pen for animals")]
