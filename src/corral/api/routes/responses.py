"""OpenAI's Responses API over Corral runs: ``POST /v1/responses``, ``GET /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``.

A response is a run: its id is ``resp_<run id>`` and its one output message ``msg_<run id>``.
Its session is the conversation: ``previous_response_id`` sends the new input to the session of
that response's run, whose stored history is the context. Without it every request is a new
session, seeded with the request's earlier input items and with ``instructions`` as its first
(system) message. Corral has no per-run instructions: with ``previous_response_id`` they are
not applied (the session keeps the context it has).

``stream: true`` answers with OpenAI's event sequence (``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., the ``.done`` events, then ``response.completed`` or
``response.failed``), each with a ``sequence_number``. The sequence is a function of the run's
stored events alone, so a replay (``GET /v1/responses/{id}?stream=true&starting_after=N``) gives
the same numbers, from N+1, and then follows the run live.

``background: true`` answers at once (``queued`` or ``in_progress``); the run goes on whatever
the client does. ``store: false`` is accepted, but the run and its session are stored like any
other (Corral's sessions are durable): the response can still be retrieved and continued.

Not yet: the client's own function tools and ``function_call_output`` items (400).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep, PrincipalDep, owned_run
from corral.api.errors import error_body
from corral.api.json_body import CheckedRoute, UnusableBody
from corral.api.retry_advice import advice_headers, advise, for_key, outcome_headers
from corral.errors import Conflict, InvalidInput, ModelNotFound, NotFound
from corral.kernel import Kernel
from corral.principals import Principal
from corral.store import Event, repo
from corral.types import CancelMode, EventType, RunStatus

router = APIRouter(tags=["openai"], route_class=CheckedRoute)

ID_PREFIX = "resp_"
# The session of a request with an Idempotency-Key and no previous response, so that its retry finds it.
CALL_SESSION_PREFIX = "responses-idempotency-key:"
KEY_MAX = 256 - len(CALL_SESSION_PREFIX)
# How long a cancel lets the current step finish before it stops the run at once.
CANCEL_GRACE_S = 2.0


# --- the request ------------------------------------------------------------------------------------


class InputPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message of ``input`` (``{"role", "content"}``, with or without ``type: "message"``), or an
    item of another type, which Corral refuses."""

    model_config = ConfigDict(extra="allow")

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        unsupported = sorted({p.type for p in self.content if p.type not in ("input_text", "output_text", "text")})
        if unsupported:
            raise InvalidInput(f"input: content parts of type {', '.join(unsupported)} are not supported; send text")
        return "".join(part.text or "" for part in self.content)


class ResponseIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=64)
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None


def _messages(body: ResponseIn) -> tuple[list[tuple[str, str]], str]:
    """The earlier messages (role, text) and the new input's text."""
    items = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not items:
        raise InvalidInput("input: send at least one message")
    for item in items:
        if item.type != "message":
            what = "the client's function tools" if item.type.startswith("function_call") else f"{item.type!r} items"
            raise InvalidInput(f"input: {what} are not supported yet; send messages")
        if item.role is None:
            raise InvalidInput("input: a message needs its role")
    *earlier, last = items
    if last.role != "user":
        raise InvalidInput("input: the last item must be a user message: it is what the agent answers")
    content = last.text()
    if not content.strip():
        raise InvalidInput("input: the last user message is empty")
    history = [("system" if m.role == "developer" else str(m.role), m.text()) for m in earlier]
    return history, content


async def _parse(request: Request) -> ResponseIn:
    """OpenAI answers a bad request with 400, so this route validates by hand instead of FastAPI's 422."""
    try:
        raw = await request.json()
    except UnusableBody as exc:
        raise InvalidInput(str(exc.detail)) from None
    try:
        body = ResponseIn.model_validate(raw)
    except ValidationError as exc:
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(summary) from None
    if body.tools:
        raise InvalidInput("tools: the client's own tools are not supported yet on /v1/responses "
                           "(the agent's own tools run inside Corral)")
    return body


# --- the response object ------------------------------------------------------------------------------


def response_id(run_id: str) -> str:
    return ID_PREFIX + run_id


def run_id_of(resp_id: str) -> str:
    if not resp_id.startswith(ID_PREFIX) or len(resp_id) == len(ID_PREFIX):
        raise NotFound(f"no response {resp_id!r}")
    return resp_id[len(ID_PREFIX):]


def _status(run_status: str) -> str:
    if run_status == RunStatus.QUEUED.value:
        return "queued"
    if run_status in (RunStatus.RUNNING.value, RunStatus.WAITING.value):
        return "in_progress"
    if run_status == RunStatus.CANCELLED.value:
        return "cancelled"
    if run_status == RunStatus.INTERRUPTED.value:
        return "failed"
    return run_status  # completed, failed


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}


def _message_item(run_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": "msg_" + run_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response_object(run_id: str, created_at: int, model: str, run_status: str, *, output: str | None = None,
                    usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
                    request: ResponseIn | None = None) -> dict[str, Any]:
    status = _status(run_status)
    items = [_message_item(run_id, output or "", "completed")] if status == "completed" else []
    failure = None
    if status == "failed":
        code = "run_interrupted" if run_status == RunStatus.INTERRUPTED.value else "server_error"
        failure = {"code": code, "message": (error or {}).get("message") or f"the run ended {run_status}"}
    return {
        "id": response_id(run_id), "object": "response", "created_at": created_at, "status": status,
        "model": model, "output": items, "usage": _usage(usage) if status == "completed" else None,
        "error": failure, "incomplete_details": None,
        "instructions": request.instructions if request else None,
        "previous_response_id": request.previous_response_id if request else None,
        "background": request.background if request else None,
        "store": request.store if request else True,
        "metadata": (request.metadata if request else None) or {},
        "parallel_tool_calls": True, "temperature": None, "top_p": None, "tool_choice": "auto", "tools": [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "reasoning": None,
        "max_output_tokens": None, "user": None,
    }


async def _read(kernel: Kernel, principal: Principal, resp_id: str) -> tuple[Any, str]:
    """A response's run row (404 if not the caller's) and its model (the session's agent)."""
    row = await owned_run(kernel, principal, run_id_of(resp_id))
    session = await kernel.store.read(repo.get_session, row.session_id)
    return row, session.agent if session is not None else ""


def _row_object(row: Any, model: str, request: ResponseIn | None = None) -> dict[str, Any]:
    return response_object(row.id, int(row.created_at.timestamp()), model, row.status, output=row.output,
                           usage=row.usage, error=row.error, request=request)


# --- the stream ----------------------------------------------------------------------------------------


class _Frames:
    """The Responses event sequence of one run, numbered from 0, built from the run's events alone."""

    def __init__(self, run_id: str, created_at: int, model: str, request: ResponseIn | None):
        self.run_id, self.created_at, self.model, self.request = run_id, created_at, model, request
        self.seq = -1
        self.text = ""
        self.started = False
        self.item_id = "msg_" + run_id

    def _frame(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def _object(self, run_status: str, **kw: Any) -> dict[str, Any]:
        return response_object(self.run_id, self.created_at, self.model, run_status, request=self.request, **kw)

    def opening(self) -> Iterator[dict[str, Any]]:
        yield self._frame("response.created", response=self._object(RunStatus.RUNNING.value))
        yield self._frame("response.in_progress", response=self._object(RunStatus.RUNNING.value))

    def _start(self) -> Iterator[dict[str, Any]]:
        if not self.started:
            self.started = True
            yield self._frame("response.output_item.added", output_index=0,
                              item={**_message_item(self.run_id, "", "in_progress"), "content": []})
            yield self._frame("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def _finish(self, text: str, status: str) -> Iterator[dict[str, Any]]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        yield self._frame("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                          text=text, logprobs=[])
        yield self._frame("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                          part=part)
        yield self._frame("response.output_item.done", output_index=0, item=_message_item(self.run_id, text, status))

    def of(self, event: Event) -> Iterator[dict[str, Any]]:
        if event.type == EventType.MESSAGE_DELTA:
            yield from self._start()
            self.text += event.data["text"]
            yield self._frame("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                              delta=event.data["text"], logprobs=[])
        elif event.is_terminal:
            data = event.data
            status = data.get("status", RunStatus.FAILED.value)
            if status == RunStatus.COMPLETED.value:
                output = data.get("output") or self.text
                yield from self._start()
                yield from self._finish(output, "completed")
                yield self._frame("response.completed", response=self._object(
                    status, output=output, usage=data.get("usage"), error=data.get("error")))
            else:
                if self.started:
                    yield from self._finish(self.text, "incomplete")
                yield self._frame("response.failed", response=self._object(status, error=data.get("error")))


async def _stream(kernel: Kernel, session_id: str, frames: _Frames, *, starting_after: int = -1,
                  cancel_on_hangup: bool = False) -> AsyncIterator[dict[str, str]]:
    def sse(frame: dict[str, Any]) -> dict[str, str]:
        return {"event": frame["type"], "data": json.dumps(frame)}

    finished = False
    try:
        for frame in frames.opening():
            if frame["sequence_number"] > starting_after:
                yield sse(frame)
        async for event in kernel.hub.observe(kernel.store, session_id, run_id=frames.run_id, stop=kernel.stopping):
            for frame in frames.of(event):
                if frame["sequence_number"] > starting_after:
                    yield sse(frame)
        finished = True
    finally:
        if not finished and cancel_on_hangup:
            kernel.cancel_soon(frames.run_id, CancelMode.SOFT)  # the client went away: stop its work


# --- the routes ----------------------------------------------------------------------------------------


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: Request,
    kernel: KernelDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=KEY_MAX)] = None,
) -> JSONResponse | EventSourceResponse:
    body = await _parse(request)
    try:
        agent = kernel.agents.get(body.model)
    except NotFound:
        raise ModelNotFound(f"The model {body.model!r} does not exist (models are Corral agents)") from None
    history, content = _messages(body)
    if body.previous_response_id is not None:
        if history:
            raise InvalidInput("input: with previous_response_id send only the new user message")
        previous, model = await _read(kernel, principal, body.previous_response_id)
        if model != agent.name:
            raise InvalidInput(f"previous_response_id: that response is of model {model!r}, not {agent.name!r}")
        session_id = previous.session_id
    else:
        if body.instructions:
            history.insert(0, ("system", body.instructions))
        key = CALL_SESSION_PREFIX + idempotency_key if idempotency_key is not None else None
        session, _ = await kernel.sessions.create(agent.name, key, {"channel": "openai-responses"},
                                                  owner=principal.name, history=history)
        if session["agent"] != agent.name:
            raise InvalidInput(f"this Idempotency-Key was used with model {session['agent']!r}")
        session_id = session["id"]
    accepted = await kernel.submit(session_id, content, origin="openai", idempotency_key=idempotency_key)
    # The run exists: from here no answer may leave the client to start it again.
    advise(request, for_key(idempotency_key))
    headers = {"x-corral-session-id": accepted.session_id, "x-corral-run-id": accepted.run_id}
    row = await kernel.store.read(repo.get_run, accepted.run_id)
    assert row is not None
    if body.stream:
        frames = _Frames(row.id, int(row.created_at.timestamp()), agent.name, body)
        # Background work, or a request that a retry may attach to, goes on when the client hangs up.
        hangup_cancels = not body.background and idempotency_key is None
        return EventSourceResponse(_stream(kernel, accepted.session_id, frames, cancel_on_hangup=hangup_cancels),
                                   ping=15, headers=headers | outcome_headers())
    if body.background:
        return JSONResponse(_row_object(row, agent.name, body), headers=headers | outcome_headers())
    async for _ in kernel.hub.observe(kernel.store, accepted.session_id, run_id=accepted.run_id,
                                      stop=kernel.stopping):
        pass  # the run's events end with its terminal event (or the server is stopping)
    row = await kernel.store.read(repo.get_run, accepted.run_id)
    assert row is not None
    if RunStatus(row.status).is_terminal:
        return JSONResponse(_row_object(row, agent.name, body), headers=headers | outcome_headers())
    # Not ended: the server is stopping. With a key a retry finds the run wherever it resumes.
    return JSONResponse(error_body("run_unfinished", "the server is stopping; the run goes on after a restart",
                                   type="server_error", param=None),
                        status_code=503, headers=headers | advice_headers(request))


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(
    response_id: str,
    kernel: KernelDep,
    principal: PrincipalDep,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1)] = -1,
) -> JSONResponse | EventSourceResponse:
    row, model = await _read(kernel, principal, response_id)
    if not stream:
        return JSONResponse(_row_object(row, model))
    frames = _Frames(row.id, int(row.created_at.timestamp()), model, None)
    return EventSourceResponse(_stream(kernel, row.session_id, frames, starting_after=starting_after), ping=15)


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(response_id: str, kernel: KernelDep, principal: PrincipalDep) -> JSONResponse:
    """The run's soft cancel, hard if its current step has not ended after ``CANCEL_GRACE_S``;
    answers once the run has ended."""
    row, model = await _read(kernel, principal, response_id)
    if not RunStatus(row.status).is_terminal:
        for mode in (CancelMode.SOFT, CancelMode.HARD):
            try:
                await kernel.cancel(row.id, mode)
            except (Conflict, NotFound):
                pass  # it ended meanwhile
            try:
                async with asyncio.timeout(CANCEL_GRACE_S if mode is CancelMode.SOFT else None):
                    async for _ in kernel.hub.observe(kernel.store, row.session_id, run_id=row.id,
                                                      stop=kernel.stopping):
                        pass
                break
            except TimeoutError:
                continue  # its step goes on: stop it at once
        row = await kernel.store.read(repo.get_run, row.id)
    return JSONResponse(_row_object(row, model))
