"""No retry storms: the official ``openai`` SDK at its default ``max_retries`` (2) makes one run per call.

The SDK retries a 409, a 5xx, a timeout and a dropped connection unless the answer says
``x-should-retry: false``; a retry carrying the call's ``Idempotency-Key`` attaches to the run
the first attempt started. Every test drives a real server over loopback and counts runs there.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request

from corral.api import errors
from corral.api.retry_advice import RetryAdvice, advise
from corral.errors import StoreUnavailable
from corral.settings import Settings
from corral.store import Store
from tests.faults import FlakyStore
from tests.helpers import (
    PARK,
    POLL_S,
    client,
    create_agent,
    http_server,
    new_http_session,
    sqlite_url,
    sse_frames,
    uvicorn_server,
)

LIMIT = 30
GATED = {"policy": {"approvals": {"wait": "ask"}}}  # its runs park on an approval until the test decides


class Attempts(httpx2.AsyncBaseTransport):
    """The SDK's HTTP transport, recording each attempt's ``x-stainless-retry-count`` and the
    status and ``x-should-retry`` of its answer; with ``first_read_timeout_s`` a call's first
    attempt gets that read timeout (far shorter than its run), so it times out and its connection
    is dropped, while the retries wait as long as needed."""

    def __init__(self, first_read_timeout_s: float | None = None):
        self._inner = httpx2.AsyncHTTPTransport()
        self._first_read_timeout_s = first_read_timeout_s
        self.attempts: list[int] = []
        self.answers: list[tuple[int, str | None]] = []
        self.timed_out = asyncio.Event()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        attempt = int(request.headers["x-stainless-retry-count"])
        self.attempts.append(attempt)
        if attempt == 0 and self._first_read_timeout_s is not None:
            request.extensions["timeout"] = {**request.extensions["timeout"], "read": self._first_read_timeout_s}
        try:
            response = await self._inner.handle_async_request(request)
        except httpx2.ReadTimeout:
            self.timed_out.set()
            raise
        self.answers.append((response.status_code, response.headers.get("x-should-retry")))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def sdk(
    settings: Settings, transport: Attempts, store: Store | None = None
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The SDK with its default retries, and a plain client, against one real server."""
    async with asyncio.timeout(LIMIT), uvicorn_server(settings, store) as (base, _kernel, _server):
        http_client = httpx2.AsyncClient(transport=transport)
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http_client) as ai, \
                client(base) as http:
            assert ai.max_retries == 2  # the default every client built on the SDK has
            yield ai, http


async def all_runs(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/v1/runs")
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


async def the_run_once(http: httpx.AsyncClient, status: str) -> dict[str, Any]:
    """The server's only run, once it has ``status`` (polled; the test's timeout bounds the wait)."""
    while True:
        runs = await all_runs(http)
        assert len(runs) <= 1, runs
        if runs and runs[0]["status"] == status:
            return runs[0]
        await asyncio.sleep(POLL_S)


def ask(content: str) -> list[Any]:
    return [{"role": "user", "content": content}]


async def test_a_failed_run_is_answered_once_and_not_retried(settings: Settings) -> None:
    transport = Attempts()
    async with sdk(settings, transport) as (ai, http):
        with pytest.raises(openai.APIStatusError) as caught:
            await ai.chat.completions.create(model="assistant", messages=ask("/fail"))
        assert caught.value.status_code == 502 and caught.value.code == "run_failed"
        assert transport.answers == [(502, "false")]
        runs = await all_runs(http)
        assert [r["status"] for r in runs] == ["failed"]
        assert caught.value.response.headers["x-corral-run-id"] == runs[0]["id"]


async def test_a_503_before_the_run_existed_is_retried_into_one_run(settings: Settings) -> None:
    store = FlakyStore(sqlite_url(settings.data_dir))
    store.fail("accept", times=1)  # the first attempt's input is refused: nothing was accepted
    transport = Attempts()
    async with sdk(settings, transport, store) as (ai, http):
        completion = await ai.chat.completions.create(model="assistant", messages=ask("hello"))
        assert completion.choices[0].message.content == "echo: hello"
        # No advice on the 503 (the SDK's own rule, retry a 503, is right there); the answer is final.
        assert transport.answers == [(503, None), (200, "false")]
        assert [(r["status"], f"chatcmpl-{r['id']}") for r in await all_runs(http)] == [("completed", completion.id)]


async def test_a_stopped_run_stays_stopped(settings: Settings) -> None:
    transport = Attempts()
    async with sdk(settings, transport) as (ai, http):
        await create_agent(http, "gated", **GATED)
        call = asyncio.create_task(ai.chat.completions.create(model="gated", messages=ask(PARK)))
        run = await the_run_once(http, "waiting")
        stopped = await http.post(f"/v1/runs/{run['id']}/cancel", json={"mode": "soft"})
        assert stopped.status_code == 202, stopped.text
        with pytest.raises(openai.ConflictError) as caught:
            await call
        assert caught.value.status_code == 409 and caught.value.code == "run_cancelled"
        assert transport.answers == [(409, "false")]  # Stop is not undone by two more runs
        assert [(r["id"], r["status"]) for r in await all_runs(http)] == [(run["id"], "cancelled")]


async def test_a_dropped_connection_retries_into_the_same_run(settings: Settings) -> None:
    transport = Attempts(first_read_timeout_s=0.2)
    async with sdk(settings, transport) as (ai, http):
        await create_agent(http, "gated", **GATED)
        key = f"call-{uuid.uuid4()}"
        call = asyncio.create_task(ai.chat.completions.with_raw_response.create(
            model="gated", messages=ask(PARK), extra_headers={"Idempotency-Key": key}))
        # The first attempt times out while its run waits for approval: the SDK drops that
        # connection and sends the call again.
        await transport.timed_out.wait()
        run = await the_run_once(http, "waiting")
        [pending] = (await http.get(f"/v1/runs/{run['id']}")).json()["pending_approvals"]
        decided = await http.post(f"/v1/runs/{run['id']}/approvals/{pending['call_id']}",
                                  json={"decision": "approve"})
        assert decided.status_code == 202, decided.text
        reply = await call
        assert transport.attempts == [0, 1] and transport.answers == [(200, "false")]
        assert reply.headers["x-corral-run-id"] == run["id"]
        assert reply.parse().id == f"chatcmpl-{run['id']}"
        assert reply.parse().choices[0].message.content == "tool results: waited 1 ms"
        assert [(r["id"], r["status"]) for r in await all_runs(http)] == [(run["id"], "completed")]


@pytest.mark.parametrize("pinned", [False, True])
async def test_a_key_answers_every_attempt_from_one_run(settings: Settings, pinned: bool) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        pin = {"x-corral-session": "conv"} if pinned else {}
        body = {"model": "assistant", "messages": ask("hello")}
        first = await http.post("/v1/chat/completions", json=body, headers={"idempotency-key": "k1", **pin})
        again = await http.post("/v1/chat/completions", json=body, headers={"idempotency-key": "k1", **pin})
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["id"] == again.json()["id"]
        assert first.headers["x-should-retry"] == again.headers["x-should-retry"] == "false"
        for name in ("x-corral-session-id", "x-corral-run-id"):
            assert first.headers[name] == again.headers[name]
        assert len(await all_runs(http)) == 1
        # Another key is another call: a run of its own (in the same session when it is pinned).
        other = await http.post("/v1/chat/completions", json=body, headers={"idempotency-key": "k2", **pin})
        assert other.status_code == 200 and other.headers["x-corral-run-id"] != first.headers["x-corral-run-id"]
        same_session = other.headers["x-corral-session-id"] == first.headers["x-corral-session-id"]
        assert same_session is pinned
        assert len(await all_runs(http)) == 2
        # A key names a call of one model: the same key for another model is refused, not mixed up.
        await create_agent(http, "second")
        if not pinned:
            mixed = await http.post("/v1/chat/completions", json={**body, "model": "second"},
                                    headers={"idempotency-key": "k1"})
            assert mixed.status_code == 400 and "x-should-retry" not in mixed.headers


async def test_a_streaming_call_with_a_key_survives_its_hang_up(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        await create_agent(http, "talker", provider_options={"token_ms": 20})
        body = {"model": "talker", "stream": True, "messages": ask("one two three four five six")}
        headers = {"idempotency-key": "streamed"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.headers["x-should-retry"] == "false"
            run_id = response.headers["x-corral-run-id"]
            async for frame in sse_frames(response):
                assert frame.data != "[DONE]"
                break  # the run is under way; hang up as a dropped connection would
        # The retry attaches to the same run, which went on, and streams it from its start.
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.headers["x-corral-run-id"] == run_id
            data = [frame.data async for frame in sse_frames(response)]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "echo: one two three four five six"
        assert [(r["id"], r["status"]) for r in await all_runs(http)] == [(run_id, "completed")]


async def test_a_native_message_says_not_to_retry_once_accepted(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), http_server(settings) as (base, _kernel), client(base) as http:
        await create_agent(http, "gated", **GATED)
        sid = await new_http_session(http, "gated")
        accepted = await http.post(f"/v1/sessions/{sid}/messages", json={"content": PARK})
        assert accepted.status_code == 202 and accepted.headers["x-should-retry"] == "false"
        # Refused before anything was stored: no advice, the client's own rules apply.
        refused = await http.post(f"/v1/sessions/{sid}/messages", json={"content": "x", "mode": "reject"})
        assert refused.status_code == 409 and "x-should-retry" not in refused.headers


@pytest.mark.parametrize(("advice", "raised", "status"), [
    (RetryAdvice.RETRY, StoreUnavailable("the store is down", retry_after=2), 503),
    (RetryAdvice.DONT, StoreUnavailable("the store is down", retry_after=2), 503),
    (RetryAdvice.DONT, RuntimeError("a bug"), 500),
    (None, StoreUnavailable("the store is down", retry_after=2), 503),
])
async def test_errors_after_a_run_was_created_carry_the_advice(
    advice: RetryAdvice | None, raised: Exception, status: int
) -> None:
    app = FastAPI()
    errors.install(app)

    @app.post("/work")
    async def work(request: Request) -> None:
        if advice is not None:
            advise(request, advice)  # as a route does once its run exists
        raise raised

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with asyncio.timeout(LIMIT), httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/work")
    assert response.status_code == status
    assert response.headers.get("x-should-retry") == (None if advice is None else advice.value)
    if status == 503:
        assert response.headers["retry-after"] == "2"
