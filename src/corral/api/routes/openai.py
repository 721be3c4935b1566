"""The OpenAI-compatible endpoint: any OpenAI client can talk to a Corral agent.

``model`` names the agent. Without a pinned session every request is a fresh session
whose context is the request's earlier messages. With ``X-Corral-Session: KEY`` (or
the ``user`` field) the caller's session of that key keeps the conversation: on first
use it is seeded with the earlier messages, afterwards only the last user message is
new, and the stored history is the context. The agent's own tool calls stay inside
Corral; the client sees the final text. A request with tools, a tool choice or a response
format of its own, or with tool calls in its history, is served by ``api/chat_tools.py``: a
call of one of its tools comes back as ``tool_calls``, and its results resume the same run.

Retries: OpenAI's SDKs retry a 409, a 5xx and a dropped connection twice by default. Every
answer after the run exists says ``x-should-retry`` (``api/retry_advice.py``), and a request
with an ``Idempotency-Key`` attaches to the run its first attempt started: the key is the
input's key in its session, and without a pinned session it names that session too.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from corral.api.chat_tools import client_tools_completion, uses_client_tools
from corral.api.deps import KernelDep, PrincipalDep
from corral.api.json_body import CheckedRoute, UnusableBody
from corral.api.openai_schemas import UNFINISHED as _UNFINISHED
from corral.api.openai_schemas import ChatCompletionIn, chunk, completion, model_entry, openai_usage
from corral.api.openai_schemas import run_error as _run_error
from corral.api.retry_advice import advice_headers, advise, for_key, outcome_headers
from corral.errors import InvalidInput, ModelNotFound, NotFound
from corral.kernel import Kernel
from corral.store import Event, repo
from corral.types import CancelMode, EventType, RunStatus

router = APIRouter(tags=["openai"], route_class=CheckedRoute)

# The session of an unpinned request with an Idempotency-Key, so that its retry finds it.
CALL_SESSION_PREFIX = "idempotency-key:"
KEY_MAX = 256 - len(CALL_SESSION_PREFIX)  # a session key holds 256 characters


@router.get("/v1/models")
async def list_models(kernel: KernelDep) -> dict[str, Any]:
    """Every agent, as an OpenAI model."""
    return {"object": "list",
            "data": [model_entry(a.name, int(a.created_at.timestamp())) for a in kernel.agents.list()]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, kernel: KernelDep) -> dict[str, Any]:
    """One agent, as an OpenAI model; an unknown one is 404 ``model_not_found``."""
    try:
        agent = kernel.agents.get(model_id)
    except NotFound:
        raise ModelNotFound(f"The model {model_id!r} does not exist (models are Corral agents)") from None
    return model_entry(agent.name, int(agent.created_at.timestamp()))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    kernel: KernelDep,
    principal: PrincipalDep,
    x_corral_session: Annotated[str | None, Header(max_length=256)] = None,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=KEY_MAX)] = None,
) -> JSONResponse | EventSourceResponse:
    body = await _parse(request)
    try:
        agent = kernel.agents.get(body.model)
    except NotFound:
        raise ModelNotFound(f"The model {body.model!r} does not exist (models are Corral agents)") from None
    if uses_client_tools(body):  # the client's own tools, their results, a response format
        call_session = CALL_SESSION_PREFIX + idempotency_key if idempotency_key is not None else None
        return await client_tools_completion(request, kernel, principal, agent.name, body,
                                             pin=x_corral_session or body.user, call_session=call_session,
                                             idempotency_key=idempotency_key)
    *earlier, last = body.messages
    if last.role != "user":
        raise InvalidInput("the last message must have role 'user': it is what the agent answers")
    content = last.text()
    if not content.strip():
        raise InvalidInput("the last user message is empty")
    if any(m.role == "tool" for m in earlier):
        raise InvalidInput("messages with role 'tool' are not supported: Corral agents run their own tools")
    history = [("system" if m.role == "developer" else m.role, m.text()) for m in earlier]

    key = x_corral_session or body.user
    if key is None and idempotency_key is not None:
        key = CALL_SESSION_PREFIX + idempotency_key  # a retry of this call finds the same session
    session, _ = await kernel.sessions.create(
        agent.name, key, {"channel": "openai"}, owner=principal.name, history=history
    )
    if session["agent"] != agent.name:
        raise InvalidInput(f"session {key!r} belongs to agent {session['agent']!r}, not {agent.name!r}")
    await kernel.client_tools.abandon_in(session["id"])  # a run waiting for tool results the client never sent
    accepted = await kernel.submit(session["id"], content, origin="openai", idempotency_key=idempotency_key)
    # The run exists: from here no answer may leave the client to start it again.
    advise(request, for_key(idempotency_key))
    headers = {"x-corral-session-id": accepted.session_id, "x-corral-run-id": accepted.run_id}
    created = int(time.time())
    events = kernel.hub.observe(kernel.store, accepted.session_id, run_id=accepted.run_id, stop=kernel.stopping)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        # With a key, a client that hangs up may be about to retry: its run goes on for the retry.
        frames = _stream(kernel, events, accepted.run_id, agent.name, created, include_usage,
                         cancel_on_hangup=idempotency_key is None)
        return EventSourceResponse(frames, ping=15, headers=headers | outcome_headers())

    async for _ in events:
        pass  # the run's events end with its terminal event (or the server is stopping)
    run = await kernel.store.read(repo.get_run, accepted.run_id)
    assert run is not None
    if run.status == RunStatus.COMPLETED.value:
        answer = completion(run.id, agent.name, created, run.output or "", run.usage)
        return JSONResponse(answer, headers=headers | outcome_headers())
    if run.status in _UNFINISHED:
        status, code = _UNFINISHED[run.status]
        return JSONResponse(_run_error(code, run.status, run.error), status_code=status,
                            headers=headers | outcome_headers())
    # Not ended: the server is stopping. With a key a retry finds the run wherever it resumes.
    return JSONResponse(_run_error("run_unfinished", run.status, run.error), status_code=503,
                        headers=headers | advice_headers(request))


async def _parse(request: Request) -> ChatCompletionIn:
    """OpenAI answers a bad request with 400, so this route validates by hand instead of FastAPI's 422."""
    try:
        raw = await request.json()
    except UnusableBody as exc:
        raise InvalidInput(str(exc.detail)) from None
    try:
        return ChatCompletionIn.model_validate(raw)
    except ValidationError as exc:
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(summary) from None


async def _stream(
    kernel: Kernel, events: AsyncIterator[Event], run_id: str, model: str, created: int, include_usage: bool,
    *, cancel_on_hangup: bool,
) -> AsyncIterator[dict[str, str]]:
    finished = False
    try:
        yield {"data": json.dumps(chunk(run_id, model, created, {"role": "assistant", "content": ""}))}
        async for event in events:
            if event.type == EventType.MESSAGE_DELTA:
                yield {"data": json.dumps(chunk(run_id, model, created, {"content": event.data["text"]}))}
            elif event.type == EventType.RUN_COMPLETED:
                yield {"data": json.dumps(chunk(run_id, model, created, {}, finish_reason="stop"))}
                if include_usage:
                    usage = openai_usage(event.data.get("usage"))
                    yield {"data": json.dumps(chunk(run_id, model, created, {}, usage=usage))}
            elif event.is_terminal:
                status = event.data.get("status", "failed")
                _, code = _UNFINISHED.get(status, (503, "run_unfinished"))
                yield {"data": json.dumps(_run_error(code, status, event.data.get("error")))}
        finished = True
        yield {"data": "[DONE]"}
    finally:
        if not finished and cancel_on_hangup:
            # The client went away (or the server is stopping): stop the work it asked for.
            kernel.cancel_soon(run_id, CancelMode.SOFT)
