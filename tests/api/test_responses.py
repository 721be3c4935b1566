"""OpenAI's Responses API (``/v1/responses``), driven by the official ``openai`` SDK over real HTTP,
and by the OpenAI Agents SDK with its default Responses model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from corral.kernel import Kernel
from corral.settings import Settings
from tests.helpers import client, http_server

LIMIT = 30


@asynccontextmanager
async def sdk(settings: Settings) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Kernel]]:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as ai, \
                client(base) as http:
            yield ai, http, kernel


async def test_create_with_text_and_with_items(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        raw = await ai.responses.with_raw_response.create(model="assistant", input="hello")
        assert raw.headers["x-should-retry"] == "false"
        response = raw.parse()
        assert response.status == "completed"
        assert response.output_text == "echo: hello"
        assert response.id == "resp_" + raw.headers["x-corral-run-id"]
        assert response.usage is not None and response.usage.total_tokens > 0
        items = await ai.responses.create(model="assistant", input=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "an earlier answer"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]}])
        assert items.output_text == "echo: second"


async def test_instructions_are_the_new_sessions_system_message(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _):
        raw = await ai.responses.with_raw_response.create(model="assistant", input="hi",
                                                          instructions="Answer like a pirate.")
        assert raw.parse().instructions == "Answer like a pirate."
        messages = (await http.get(f"/v1/sessions/{raw.headers['x-corral-session-id']}/messages")).json()
        roles = [(m["role"], m["content"]) for m in messages]
        assert roles[0] == ("system", "Answer like a pirate.")


async def test_previous_response_id_continues_the_same_session(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        first = await ai.responses.with_raw_response.create(model="assistant", input="my name is Ada")
        second = await ai.responses.with_raw_response.create(model="assistant", input="/recall",
                                                             previous_response_id=first.parse().id)
        assert second.headers["x-corral-session-id"] == first.headers["x-corral-session-id"]
        assert second.parse().previous_response_id == first.parse().id
        assert "my name is Ada" in second.parse().output_text
        with pytest.raises(openai.NotFoundError):
            await ai.responses.create(model="assistant", input="x", previous_response_id="resp_nope")


async def test_stream_with_the_sdks_helper(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        async with ai.responses.stream(model="assistant", input="stream me") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert final.output_text == "echo: stream me"
        assert final.status == "completed"
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert "response.output_text.delta" in kinds
        assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.completed"]


async def test_background_retrieve_and_resume_the_stream(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        started = await ai.responses.create(model="assistant", input="/sleep 0.3\nlater", background=True)
        assert started.status in ("queued", "in_progress")
        assert started.background is True
        # Following the background response's stream to its end.
        first: list[Any] = []
        async with ai.responses.stream(response_id=started.id) as stream:
            first = [event async for event in stream]
            final = await stream.get_final_response()
        assert final.output_text == "echo: /sleep 0.3\nlater"
        numbers = [event.sequence_number for event in first]
        assert numbers == list(range(len(first)))
        retrieved = await ai.responses.retrieve(started.id)
        assert retrieved.status == "completed" and retrieved.output_text == "echo: /sleep 0.3\nlater"
        # Resumed after the fact: the same events, numbered alike, from starting_after + 1.
        resumed = await ai.responses.retrieve(started.id, stream=True, starting_after=2)
        again = [event async for event in resumed]
        assert [e.sequence_number for e in again] == numbers[3:]
        def shape(events: list[Any]) -> list[tuple[str, int, str | None]]:
            return [(e.type, e.sequence_number, getattr(e, "delta", None)) for e in events]

        assert shape(again) == shape(first[3:])
        assert again[-1].type == "response.completed" and again[-1].response.output_text == final.output_text


async def test_a_resumed_stream_follows_a_running_response_live(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        started = await ai.responses.create(model="assistant", input="/sleep 0.5\nlive", background=True,
                                            store=False)
        assert started.store is False
        resumed = await ai.responses.retrieve(started.id, stream=True, starting_after=1)
        events = [event async for event in resumed]
        assert events[0].sequence_number == 2
        assert [e.sequence_number for e in events] == list(range(2, 2 + len(events)))
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == "echo: /sleep 0.5\nlive"
        # store: false still stores it (Corral's sessions are durable).
        assert (await ai.responses.retrieve(started.id)).status == "completed"


async def test_cancel_a_long_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, kernel):
        started = await ai.responses.create(model="assistant", input="/sleep 30\nnever", background=True)
        async with asyncio.timeout(10):
            cancelled = await ai.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        assert (await ai.responses.retrieve(started.id)).status == "cancelled"
        replay = [event async for event in await ai.responses.retrieve(started.id, stream=True)]
        assert replay[-1].type == "response.failed" and replay[-1].response.status == "cancelled"


async def test_a_failing_run_is_a_failed_response(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        raw = await ai.responses.with_raw_response.create(model="assistant", input="/fail")
        assert raw.headers["x-should-retry"] == "false"
        failed = raw.parse()
        assert failed.status == "failed"
        assert failed.error is not None and failed.error.message
        async with ai.responses.stream(model="assistant", input="/fail") as stream:
            kinds = [event.type async for event in stream]
        assert kinds[-1] == "response.failed"


async def test_bad_requests_are_400(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        with pytest.raises(openai.BadRequestError):
            await ai.responses.create(model="assistant", input=[{"role": "assistant", "content": "no user"}])
        with pytest.raises(openai.NotFoundError):
            await ai.responses.create(model="nobody", input="hi")
        with pytest.raises(openai.NotFoundError):
            await ai.responses.retrieve("resp_nope")
        with pytest.raises(openai.BadRequestError):  # results nobody waits for
            await ai.responses.create(model="assistant", input=[
                {"type": "function_call_output", "call_id": "call_nobody", "output": "x"}])
        with pytest.raises(openai.BadRequestError):
            await ai.responses.create(model="assistant", input="hi", tools=[{"type": "web_search"}])


async def test_idempotency_key_attaches_a_retry_to_the_same_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, _, _):
        headers = {"Idempotency-Key": "resp-key-1"}
        one = await ai.responses.create(model="assistant", input="once", extra_headers=headers)
        two = await ai.responses.create(model="assistant", input="once", extra_headers=headers)
        assert one.id == two.id and two.output_text == "echo: once"


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = '/tool get_weather {"city": "Paris"}'


async def test_a_function_call_comes_back_and_its_output_resumes_the_same_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _):
        raw = await ai.responses.with_raw_response.create(model="assistant", input=ASK, tools=[WEATHER])
        asked = raw.parse()
        assert asked.status == "completed"
        [call] = [item for item in asked.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        run_id = raw.headers["x-corral-run-id"]
        assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "waiting"
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        raw2 = await ai.responses.with_raw_response.create(model="assistant", previous_response_id=asked.id,
                                                           input=[output], tools=[WEATHER])
        answer = raw2.parse()
        assert raw2.headers["x-corral-run-id"] == run_id  # the same run went on
        assert answer.id != asked.id and answer.output_text == "tool results: sunny"
        assert (await ai.responses.retrieve(answer.id)).output_text == "tool results: sunny"
        assert [i.type for i in (await ai.responses.retrieve(asked.id)).output] == ["function_call"]
        # Streamed: the call as output items, then the answer's stream.
        async with ai.responses.stream(model="assistant", input=ASK, tools=[WEATHER]) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
        [streamed_call] = [item for item in final.output if item.type == "function_call"]
        output = {"type": "function_call_output", "call_id": streamed_call.call_id, "output": "rain"}
        async with ai.responses.stream(model="assistant", input=[output], tools=[WEATHER]) as stream:
            assert (await stream.get_final_response()).output_text == "tool results: rain"


async def test_a_retried_continuation_that_parked_attaches_to_its_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _):
        first = await ai.responses.create(model="assistant", input="hi")
        headers = {"Idempotency-Key": "continue-1"}
        asked = await ai.responses.create(model="assistant", input=ASK, tools=[WEATHER],
                                          previous_response_id=first.id, extra_headers=headers)
        again = await ai.responses.create(model="assistant", input=ASK, tools=[WEATHER],
                                          previous_response_id=first.id, extra_headers=headers)
        assert again.id == asked.id
        run_id = asked.id.removeprefix("resp_")
        assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "waiting"  # not abandoned by the retry


async def test_the_agents_sdk_with_its_default_responses_model(settings: Settings) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # no trace export to a remote service from a test
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async with sdk(settings) as (ai, _, _):
        model = agents.OpenAIResponsesModel(model="assistant", openai_client=ai)
        echo = agents.Agent(name="echo", model=model)
        assert (await agents.Runner.run(echo, "hello agents")).final_output == "echo: hello agents"
        forecaster = agents.Agent(name="forecaster", instructions="Answer with the weather.", model=model,
                                  tools=[get_weather])
        result = await agents.Runner.run(forecaster, ASK)
        assert calls == ["Paris"] and result.final_output == "tool results: sunny in Paris"
        streamed = agents.Runner.run_streamed(forecaster, '/tool get_weather {"city": "Oslo"}')
        async for _ in streamed.stream_events():
            pass
        assert calls == ["Paris", "Oslo"] and streamed.final_output == "tool results: sunny in Oslo"
