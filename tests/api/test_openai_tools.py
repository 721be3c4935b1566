"""Client tools and structured output on POST /v1/chat/completions, driven by the official ``openai``
SDK over real HTTP: the model's call of a request's own tool comes back as ``tool_calls`` (the run
parks, holding nothing), and the client's results resume that same run."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from corral.kernel import Kernel
from corral.settings import Settings
from corral.types import RunStatus
from tests.helpers import assert_error, client, create_agent, http_server
from tests.helpers.processes import corral_serve

LIMIT = 30
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = '/tool get_weather {"city": "Paris"}'


@asynccontextmanager
async def sdk(settings: Settings) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Kernel]]:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, kernel):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as ai, \
                client(base) as http:
            yield ai, http, kernel


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def answered(message: Any, *results: str) -> list[dict[str, Any]]:
    """The assistant's tool-call message as the client sends it back, and one result per call."""
    assistant = message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})
    return [assistant, *({"role": "tool", "tool_call_id": call.id, "content": result}
                         for call, result in zip(message.tool_calls, results, strict=True))]


async def runs_of(http: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    return list((await http.get("/v1/runs", params={"session_id": session_id})).json()["runs"])


async def test_a_call_of_a_client_tool_comes_back_and_its_result_resumes_the_same_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, kernel):
        messages = [user(ASK)]
        raw = await ai.chat.completions.with_raw_response.create(model="assistant", messages=messages,
                                                                 tools=[WEATHER])
        first = raw.parse()
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
            "function", "get_weather", {"city": "Paris"})
        run_id, session_id = raw.headers["x-corral-run-id"], raw.headers["x-corral-session-id"]
        assert raw.headers["x-should-retry"] == "false"
        assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "waiting"
        handle = kernel.run_handle(run_id)
        assert handle is not None and handle.status is RunStatus.WAITING

        raw = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=messages + answered(choice.message, "sunny, 21 C"), tools=[WEATHER])
        second = raw.parse()
        assert (second.choices[0].finish_reason, second.choices[0].message.content) == (
            "stop", "tool results: sunny, 21 C")
        assert raw.headers["x-corral-run-id"] == run_id  # the same run went on
        assert second.id != first.id  # each answer its own id (LangGraph keys messages by it)
        runs = await runs_of(http, session_id)
        assert [(r["id"], r["status"]) for r in runs] == [(run_id, "completed")]
        stored = (await http.get(f"/v1/sessions/{session_id}/messages")).json()
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]


async def test_the_stream_sends_the_calls_as_openai_does_and_the_follow_up_streams_the_rest(
        settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _kernel):
        await create_agent(http, "talker", provider_options={"token_ms": 1})
        messages = [user('/tool get_weather {"city": "Paris"}\n/tool get_weather {"city": "Oslo"}')]
        stream = await ai.chat.completions.create(model="talker", messages=messages, tools=[WEATHER], stream=True,
                                                  stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or ()]
        assert [(d.index, d.id, d.function.name if d.function else None) for d in deltas if d.id] == [
            (0, deltas[0].id, "get_weather"), (1, deltas[2].id, "get_weather")]
        arguments = {i: "".join(d.function.arguments or "" for d in deltas if d.index == i and d.function)
                     for i in (0, 1)}
        assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}, 1: {"city": "Oslo"}}
        finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finishes == ["tool_calls"]
        assert chunks[-1].usage is not None and chunks[-1].choices == []

        # The SDK's own accumulator reads the same stream into a message with both calls.
        async with ai.chat.completions.stream(model="talker", messages=messages, tools=[WEATHER]) as events:
            final = await events.get_final_completion()
        message = final.choices[0].message
        assert [c.function.name for c in message.tool_calls or ()] == ["get_weather", "get_weather"]

        follow_up = messages + answered(message, "sun", "snow")
        stream = await ai.chat.completions.create(model="talker", messages=follow_up, tools=[WEATHER],
                                                  stream=True)
        text, finish = "", None
        async for part in stream:
            for ch in part.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert (text, finish) == ("tool results: sun; snow", "stop")


async def test_a_pinned_session_resumes_its_run_and_a_new_message_abandons_it(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _kernel):
        pin = {"X-Corral-Session": "tools-chat"}
        messages = [{"role": "system", "content": "be brief"}, user(ASK)]
        first = await ai.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER],
                                                 extra_headers=pin)
        raw = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=messages + answered(first.choices[0].message, "rain"), tools=[WEATHER],
            extra_headers=pin)
        assert raw.parse().choices[0].message.content == "tool results: rain"
        session_id = raw.headers["x-corral-session-id"]

        # Calls again, and the client moves on without the results: that run is cancelled, the new one answers.
        parked = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[user(ASK)], tools=[WEATHER], extra_headers=pin)
        assert parked.parse().choices[0].finish_reason == "tool_calls"
        reply = await ai.chat.completions.create(model="assistant", messages=[user("never mind")],
                                                 extra_headers=pin)
        assert reply.choices[0].message.content == "echo: never mind"
        runs = await runs_of(http, session_id)
        assert [r["status"] for r in runs] == ["completed", "cancelled", "completed"]
        cancelled = next(r for r in runs if r["id"] == parked.headers["x-corral-run-id"])
        assert "without the results" in cancelled["error"]["message"]


async def test_a_run_waiting_for_its_client_holds_no_model_slot(settings: Settings) -> None:
    """With the one model slot of its agent, the agent serves other sessions while a run waits."""
    async with sdk(settings) as (ai, http, _kernel):
        await create_agent(http, "narrow", provider_options={"max_concurrent_calls": 1, "latency_ms": 20})
        raw = await ai.chat.completions.with_raw_response.create(model="narrow", messages=[user(ASK)],
                                                                 tools=[WEATHER])
        assert raw.parse().choices[0].finish_reason == "tool_calls"
        others = await asyncio.gather(*(ai.chat.completions.create(model="narrow", messages=[user(f"hi {i}")])
                                        for i in range(3)))
        assert [o.choices[0].message.content for o in others] == ["echo: hi 0", "echo: hi 1", "echo: hi 2"]
        assert (await http.get(f"/v1/runs/{raw.headers['x-corral-run-id']}")).json()["status"] == "waiting"


async def test_structured_output_gets_the_smallest_instance_of_the_schema(settings: Settings) -> None:
    class Person(BaseModel):
        name: str
        age: int
        nickname: str | None

    async with sdk(settings) as (ai, _http, _kernel):
        parsed = await ai.chat.completions.parse(model="assistant", messages=[user("who is it?")],
                                                 response_format=Person)
        assert parsed.choices[0].message.parsed == Person(name="", age=0, nickname="")
        reply = await ai.chat.completions.create(model="assistant", messages=[user("hi")],
                                                 response_format={"type": "json_object"})
        assert json.loads(reply.choices[0].message.content or "") == {"echo": "echo: hi"}


async def test_tool_choice_with_the_demo_model(settings: Settings) -> None:
    async with sdk(settings) as (ai, _http, _kernel):
        async def ask(text: str, choice: Any) -> Any:
            reply = await ai.chat.completions.create(model="assistant", messages=[user(text)], tools=[WEATHER],
                                                     tool_choice=choice)
            return reply.choices[0]

        none = await ask(ASK, "none")
        assert (none.finish_reason, none.message.content) == ("stop", "echo: " + ASK)
        auto = await ask("hello", "auto")
        assert (auto.finish_reason, auto.message.content) == ("stop", "echo: hello")
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            forced = await ask("hello", choice)
            assert forced.finish_reason == "tool_calls"
            [call] = forced.message.tool_calls or []
            assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": ""})


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named"),
    ({"tools": [WEATHER, WEATHER]}, "same name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
])
async def test_bad_client_tools_are_400(settings: Settings, body: dict[str, Any], message: str) -> None:
    async with sdk(settings) as (_ai, http, _kernel):
        response = await http.post("/v1/chat/completions", json={"model": "assistant", "messages": [user("x")],
                                                                  **body})
        assert message in assert_error(response, 400)["message"]
        assert (await http.get("/v1/runs")).json()["runs"] == []


async def test_results_nobody_waits_for_or_a_part_of_them_are_400(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _kernel):
        stranger = [user("hi"), {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_stranger", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_stranger", "content": "?"}]
        response = await http.post("/v1/chat/completions", json={"model": "assistant", "messages": stranger,
                                                                  "tools": [WEATHER]})
        assert "waits for the results" in assert_error(response, 400)["message"]

        messages = [user(ASK + '\n/tool get_weather {"city": "Rome"}')]
        first = await ai.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER])
        message = first.choices[0].message
        partial = messages + answered(message, "one", "two")[:2]
        response = await http.post("/v1/chat/completions", json={"model": "assistant", "messages": partial,
                                                                  "tools": [WEATHER]})
        assert "are missing" in assert_error(response, 400)["message"]
        whole = await ai.chat.completions.create(model="assistant", messages=messages + answered(message, "a", "b"),
                                                 tools=[WEATHER])
        assert whole.choices[0].message.content == "tool results: a; b"


async def test_a_retried_follow_up_reads_the_same_answer(settings: Settings) -> None:
    """A client that sends its results twice (its first attempt's answer was lost) gets the run's
    answer again; nothing runs twice."""
    async with sdk(settings) as (ai, http, _kernel):
        messages = [user(ASK)]
        first = await ai.chat.completions.create(model="assistant", messages=messages, tools=[WEATHER])
        follow_up = messages + answered(first.choices[0].message, "hail")
        once = await ai.chat.completions.create(model="assistant", messages=follow_up, tools=[WEATHER])
        again = await ai.chat.completions.create(model="assistant", messages=follow_up, tools=[WEATHER])
        assert once.choices[0].message.content == again.choices[0].message.content == "tool results: hail"
        assert once.id == again.id
        assert len((await http.get("/v1/runs")).json()["runs"]) == 1


async def test_a_run_waiting_for_its_client_survives_kill_9(tmp_path: Path) -> None:
    """A real ``corral serve`` killed with SIGKILL while a run waits for the client's results: after a
    restart on the same data, the run is still waiting and the client's results resume it."""
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path) as server:
            async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0) as ai:
                raw = await ai.chat.completions.with_raw_response.create(
                    model="assistant", messages=[user(ASK)], tools=[WEATHER])
            message = raw.parse().choices[0].message
            run_id = raw.headers["x-corral-run-id"]
            server.proc.send_signal(signal.SIGKILL)
            await server.proc.wait()
        async with corral_serve(tmp_path) as server, client(server.base) as http:
            run = (await http.get(f"/v1/runs/{run_id}")).json()
            assert run["status"] == "waiting", run
            [call] = message.tool_calls
            assert run["pending_client_calls"] == [{"call_id": call.id, "tool": "get_weather",
                                                    "arguments": {"city": "Paris"}}]
            async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0) as ai:
                raw = await ai.chat.completions.with_raw_response.create(
                    model="assistant", messages=[user(ASK), *answered(message, "after the crash")], tools=[WEATHER])
            assert raw.parse().choices[0].message.content == "tool results: after the crash"
            assert raw.headers["x-corral-run-id"] == run_id
            assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "completed"


async def test_an_idempotency_key_attaches_a_retry_to_the_parked_run(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _kernel):
        key = {"Idempotency-Key": "call-1"}
        attempts = [await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[user(ASK)], tools=[WEATHER], extra_headers=key) for _ in range(2)]
        assert attempts[0].headers["x-corral-run-id"] == attempts[1].headers["x-corral-run-id"]
        first, second = (a.parse().choices[0].message for a in attempts)
        assert [c.id for c in first.tool_calls or ()] == [c.id for c in second.tool_calls or ()]
        done = await ai.chat.completions.create(model="assistant", messages=[user(ASK), *answered(first, "dry")],
                                                tools=[WEATHER], extra_headers={"Idempotency-Key": "call-2"})
        assert done.choices[0].message.content == "tool results: dry"
        assert len((await http.get("/v1/runs")).json()["runs"]) == 1


async def test_without_a_pinned_session_a_new_message_moves_on_from_the_calls(settings: Settings) -> None:
    async with sdk(settings) as (ai, http, _kernel):
        raw = await ai.chat.completions.with_raw_response.create(model="assistant", messages=[user(ASK)],
                                                                 tools=[WEATHER])
        message = raw.parse().choices[0].message
        assistant = message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})
        reply = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[user(ASK), assistant, user("forget it")], tools=[WEATHER])
        assert reply.parse().choices[0].finish_reason == "stop"
        assert reply.headers["x-corral-run-id"] != raw.headers["x-corral-run-id"]
        abandoned = (await http.get(f"/v1/runs/{raw.headers['x-corral-run-id']}")).json()
        assert abandoned["status"] == "cancelled" and "without the results" in abandoned["error"]["message"]
