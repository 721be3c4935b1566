"""The OpenAI-compatible endpoint, driven by the official ``openai`` SDK over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import pytest

from corral.settings import Settings
from tests.helpers import client, create_agent, http_server, sse_frames

LIMIT = 30


@asynccontextmanager
async def sdk(
    settings: Settings, api_key: str = "unused"
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """An OpenAI SDK client and a plain HTTP client against one real server."""
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel):
        headers = {"Authorization": f"Bearer {api_key}"}
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as ai, \
                client(base, headers=headers) as http:
            yield ai, http


async def test_models_lists_the_agents(settings: Settings) -> None:
    async with sdk(settings) as (ai, http):
        await create_agent(http, "second")
        models = [model async for model in ai.models.list()]
        assert [m.id for m in models] == ["assistant", "second"]
        assert all(m.owned_by == "corral" and m.object == "model" for m in models)


async def test_a_model_is_retrieved_by_its_id(settings: Settings) -> None:
    async with sdk(settings) as (ai, http):
        model = await ai.models.retrieve("assistant")
        assert (model.id, model.object, model.owned_by) == ("assistant", "model", "corral")
        listed = [m async for m in ai.models.list()]
        assert [model] == [m for m in listed if m.id == "assistant"]
        with pytest.raises(openai.NotFoundError) as caught:
            await ai.models.retrieve("nobody")
        assert caught.value.status_code == 404
        assert (caught.value.code, caught.value.type) == ("model_not_found", "invalid_request_error")
        assert "nobody" in caught.value.message
        assert (await http.get("/v1/models/nobody")).json()["error"]["code"] == "model_not_found"


async def test_non_streaming_completion(settings: Settings) -> None:
    async with sdk(settings) as (ai, http):
        reply = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": "hello there"}]
        )
        completion = reply.parse()
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content == "echo: hello there"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == "assistant"
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3
        # The run behind it is an ordinary Corral run, visible through the REST API.
        run_id = reply.headers["x-corral-run-id"]
        assert completion.id == f"chatcmpl-{run_id}"
        run = (await http.get(f"/v1/runs/{run_id}")).json()
        assert run["status"] == "completed" and run["output"] == "echo: hello there"


async def test_streaming_completion_yields_the_tokens_as_they_come(settings: Settings) -> None:
    async with sdk(settings) as (ai, http):
        await create_agent(http, "talker", provider_options={"token_ms": 5})
        stream = await ai.chat.completions.create(
            model="talker", messages=[{"role": "user", "content": "one two three four"}], stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async for part in stream:
            if part.usage is not None:
                usage = part.usage
            for choice in part.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        assert "".join(pieces) == "echo: one two three four"
        assert len(pieces) == 5  # word by word, not one block
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens == 5


async def test_the_request_messages_become_the_context(settings: Settings) -> None:
    async with sdk(settings) as (ai, _http):
        completion = await ai.chat.completions.create(model="assistant", messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": "hello Ada"},
            {"role": "user", "content": [{"type": "text", "text": "/recall"}]},
        ])
        assert completion.choices[0].message.content == 'recall: ["my name is Ada"]'
        # Without a pinned session each request is a conversation of its own.
        alone = await ai.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "/recall"}])
        assert alone.choices[0].message.content == "recall: []"


@pytest.mark.parametrize("pin", ["header", "user"])
async def test_a_pinned_session_remembers_the_previous_turn(settings: Settings, pin: str) -> None:
    async with sdk(settings) as (ai, http):
        def pinned(key: str) -> dict[str, object]:
            return {"extra_headers": {"X-Corral-Session": key}} if pin == "header" else {"user": key}

        first = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": "my name is Ada"}], **pinned("conv-1"))
        second = await ai.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": "/recall"}], **pinned("conv-1"))
        assert second.parse().choices[0].message.content == 'recall: ["my name is Ada"]'
        session_id = first.headers["x-corral-session-id"]
        assert second.headers["x-corral-session-id"] == session_id
        # A plain client re-sends the whole history: the stored history stays the context, nothing doubles.
        third = await ai.chat.completions.create(model="assistant", messages=[
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": "echo: my name is Ada"},
            {"role": "user", "content": "/recall"},
        ], **pinned("conv-1"))
        assert third.choices[0].message.content == 'recall: ["my name is Ada", "/recall"]'
        messages = (await http.get(f"/v1/sessions/{session_id}/messages")).json()
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        # Another key is another conversation.
        other = await ai.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "/recall"}], **pinned("conv-2"))
        assert other.choices[0].message.content == "recall: []"


async def test_unknown_model_is_an_openai_style_not_found(settings: Settings) -> None:
    async with sdk(settings) as (ai, http):
        with pytest.raises(openai.NotFoundError) as caught:
            await ai.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 404
        assert caught.value.code == "model_not_found"
        assert caught.value.type == "invalid_request_error"
        assert "nobody" in caught.value.message
        assert (await http.get("/v1/sessions")).json() == []  # nothing was stored


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": "assistant", "messages": []}, "messages"),
    ({"model": "assistant", "messages": [{"role": "assistant", "content": "hi"}]}, "role 'user'"),
    ({"model": "assistant", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "assistant", "messages": [{"role": "user", "content": "  "}]}, "empty"),
    ({"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n=1"),
    ({"model": "assistant", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"model": "assistant", "messages": [{"role": "tool", "content": "r", "tool_call_id": "c"},
                                         {"role": "user", "content": "hi"}]}, "tool"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
])
async def test_bad_requests_are_400_and_store_nothing(settings: Settings, body: dict[str, object],
                                                       fragment: str) -> None:
    async with sdk(settings) as (_ai, http):
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and fragment in error["message"]
        assert (await http.get("/v1/sessions")).json() == []
        malformed = await http.post("/v1/chat/completions", content=b"{not json",
                                    headers={"content-type": "application/json"})
        assert malformed.status_code == 400


async def test_a_failing_run_is_an_error_in_both_forms(settings: Settings) -> None:
    async with sdk(settings) as (ai, _http):
        with pytest.raises(openai.APIStatusError) as caught:
            await ai.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "/fail"}])
        assert caught.value.status_code == 502 and caught.value.code == "run_failed"
        assert "told to fail" in caught.value.message
        stream = await ai.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "/fail"}], stream=True)
        with pytest.raises(openai.APIError, match="told to fail"):
            async for _ in stream:
                pass


async def test_a_client_that_goes_away_mid_stream_cancels_its_run(settings: Settings) -> None:
    async with sdk(settings) as (_ai, http):
        body = {"model": "assistant", "stream": True, "messages": [{"role": "user", "content": "/steps 50 200"}]}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            run_id = response.headers["x-corral-run-id"]
            async for frame in sse_frames(response):
                assert frame.data != "[DONE]"
                break  # the first chunk came: the run is under way; now hang up
        async with http.stream("GET", f"/v1/runs/{run_id}/events") as events:
            terminal = [frame async for frame in sse_frames(events)][-1]
        assert terminal.event == "run.cancelled"
