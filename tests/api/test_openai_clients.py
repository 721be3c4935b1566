"""Third-party OpenAI clients with tools and structured output, against a real server over loopback:
LangChain's ``bind_tools`` and ``with_structured_output`` (langchain-openai), and the OpenAI Agents
SDK's function tools and output types through its chat-completions model. The demo model calls a
client tool when told ``/tool NAME {json}`` and answers a JSON schema with its smallest instance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
from pydantic import BaseModel

from corral.settings import Settings
from tests.helpers import client, http_server

LIMIT = 30


class Person(BaseModel):
    name: str
    age: int


@asynccontextmanager
async def server(settings: Settings) -> AsyncIterator[str]:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel):
        yield base


@asynccontextmanager
async def chat_openai(base: str) -> AsyncIterator[Any]:
    """LangChain's ChatOpenAI on an HTTP client of the test's own, closed at the end (its default
    client is shared and never closed)."""
    from langchain_openai import ChatOpenAI

    async with httpx.AsyncClient() as http:
        yield ChatOpenAI(model="assistant", base_url=f"{base}/v1", api_key="unused", max_retries=0,
                         http_async_client=http)


async def runs(base: str) -> list[dict[str, object]]:
    async with client(base) as http:
        return list((await http.get("/v1/runs")).json()["runs"])


# --- LangChain (langchain-openai) ---------------------------------------------------------------


async def test_langchain_bind_tools_round_trip(settings: Settings) -> None:
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async with server(settings) as base, chat_openai(base) as llm:
        bound = llm.bind_tools([get_weather])
        question = HumanMessage('/tool get_weather {"city": "Paris"}')
        asked = await bound.ainvoke([question])
        assert isinstance(asked, AIMessage)
        [call] = asked.tool_calls
        assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})
        result = await get_weather.ainvoke(call)  # a ToolMessage for the call
        final = await bound.ainvoke([question, asked, result])
        assert final.content == "tool results: sunny in Paris"
        assert final.id != asked.id  # LangGraph's message list keys messages by id
        [run] = await runs(base)
        assert run["status"] == "completed"  # one run: the results resumed it

        # Streamed: LangChain gathers the tool-call chunks into one call.
        gathered = None
        async for piece in bound.astream([HumanMessage('/tool get_weather {"city": "Oslo"}')]):
            gathered = piece if gathered is None else gathered + piece
        assert gathered is not None
        assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [("get_weather", {"city": "Oslo"})]


async def test_langchain_with_structured_output(settings: Settings) -> None:
    async with server(settings) as base, chat_openai(base) as llm:
        # The default method sends a JSON schema as response_format; function calling forces a tool.
        assert await llm.with_structured_output(Person).ainvoke("who is it?") == Person(name="", age=0)
        by_call = llm.with_structured_output(Person, method="function_calling")
        assert await by_call.ainvoke("who is it?") == Person(name="", age=0)
        raw = await llm.with_structured_output(Person, method="json_mode", include_raw=True).ainvoke(
            "reply in JSON")
        assert raw["raw"].content == '{"echo": "echo: reply in JSON"}'


# --- the OpenAI Agents SDK ----------------------------------------------------------------------


async def test_agents_sdk_function_tools_through_chat_completions(settings: Settings) -> None:
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no trace export to a remote service from a test

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async with server(settings) as base:
        ai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        model = OpenAIChatCompletionsModel(model="assistant", openai_client=ai)
        agent = Agent(name="forecaster", instructions="Answer with the weather.", model=model, tools=[get_weather])
        result = await Runner.run(agent, '/tool get_weather {"city": "Paris"}')
        assert calls == ["Paris"]
        assert result.final_output == "tool results: sunny in Paris"
        [run] = await runs(base)
        assert run["status"] == "completed"

        streamed = Runner.run_streamed(agent, '/tool get_weather {"city": "Oslo"}')
        async for _ in streamed.stream_events():
            pass
        assert calls == ["Paris", "Oslo"] and streamed.final_output == "tool results: sunny in Oslo"

        typed = Agent(name="typed", instructions="Who?", model=model, output_type=Person)
        assert (await Runner.run(typed, "who is it?")).final_output == Person(name="", age=0)
        await ai.close()
