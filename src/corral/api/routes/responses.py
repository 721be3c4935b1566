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

Function tools: a request's own ``tools`` (``type: "function"``), ``tool_choice`` and ``text.format``
(json_schema, json_object) go to its run (``api/turns.py``, as chat completions' client tools).
When the model calls one of them the run parks (``waiting``, holding nothing) and the response
completes with ``function_call`` output items (``call_id``, ``name``, ``arguments``). A request whose
input ends with ``function_call_output`` items resumes that same run, found by the call ids (with
``previous_response_id`` or with the whole history, as the Agents SDK sends it); its response is
``resp_<run id>-<first call id answered>``: what the run did after those results. Other tool types
(web search, file search...) are refused (400): the agent's own tools run inside Corral.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep, PrincipalDep, owned_run
from corral.api.errors import error_body
from corral.api.json_body import CheckedRoute, UnusableBody
from corral.api.retry_advice import advice_headers, advise, for_key, outcome_headers
from corral.api.turns import begin_turn, resume_turn
from corral.errors import Conflict, InvalidInput, ModelNotFound, NotFound
from corral.kernel import Kernel
from corral.principals import Principal
from corral.providers.base import ChatMessage, ModelOptions, ResponseFormat, ToolCall, ToolChoice, ToolSpec
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
    """An item of ``input``: a message (``{"role", "content"}``, with or without ``type: "message"``),
    a ``function_call`` of an earlier response, or a ``function_call_output`` (the client's result)."""

    model_config = ConfigDict(extra="allow")

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = Field(None, min_length=1, max_length=64)
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None

    def text(self) -> str:
        return _text(self.content)


def _text(content: str | list[InputPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    unsupported = sorted({p.type for p in content if p.type not in ("input_text", "output_text", "text")})
    if unsupported:
        raise InvalidInput(f"input: content parts of type {', '.join(unsupported)} are not supported; send text")
    return "".join(part.text or "" for part in content)


class FunctionToolIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    name: str | None = None


class TextFormatIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormatIn | None = None


class ResponseIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=160)
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    tools: list[FunctionToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    text: TextIn | None = None


def model_options(body: ResponseIn) -> ModelOptions | None:
    """The request's own function tools, tool_choice and text format, for its run's model calls."""
    specs: list[ToolSpec] = []
    for tool in body.tools or ():
        if tool.type != "function" or tool.name is None:
            raise InvalidInput(f"tools: only function tools (with a name) are supported, not {tool.type!r}")
        specs.append(ToolSpec(tool.name, tool.description or "",
                              tool.parameters or {"type": "object", "properties": {}}))
    names = {spec.name for spec in specs}
    if len(names) != len(specs):
        raise InvalidInput("tools: two tools have the same name")
    choice: ToolChoice | None = None
    raw = body.tool_choice
    if isinstance(raw, NamedToolChoice):
        if raw.type != "function" or raw.name not in names:
            raise InvalidInput(f"tool_choice: no function tool named {raw.name!r} in tools")
        choice = ToolChoice("function", raw.name)
    elif raw == "required":
        if not names:
            raise InvalidInput("tool_choice: 'required' needs tools")
        choice = ToolChoice("required")
    elif raw in ("auto", "none"):
        choice = ToolChoice(raw)
    fmt = body.text.format if body.text is not None else None
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = ResponseFormat("json_object")
    elif fmt is not None and fmt.type == "json_schema":
        response_format = ResponseFormat("json_schema", fmt.name, fmt.schema_ or {}, fmt.strict, fmt.description)
    if not specs and choice is None and response_format is None:
        return None
    return ModelOptions(tuple(specs), choice, response_format)


def _items(body: ResponseIn) -> list[InputItem]:
    items = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not items:
        raise InvalidInput("input: send at least one item")
    for item in items:
        if item.type == "message" and item.role is None:
            raise InvalidInput("input: a message needs its role")
        if item.type in ("function_call", "function_call_output") and item.call_id is None:
            raise InvalidInput(f"input: a {item.type} item needs its call_id")
        if item.type == "function_call" and item.name is None:
            raise InvalidInput("input: a function_call item needs its name")
        if item.type not in ("message", "function_call", "function_call_output"):
            raise InvalidInput(f"input: items of type {item.type!r} are not supported")
    return items


def trailing_results(items: list[InputItem]) -> dict[str, str]:
    """The function_call_output items the input ends with (call id -> output)."""
    start = len(items)
    while start and items[start - 1].type == "function_call_output":
        start -= 1
    return {str(item.call_id): _text(item.output) for item in items[start:]}


def history(items: list[InputItem]) -> list[ChatMessage]:
    """Earlier input items as a model's context has them: function calls join an assistant message."""
    messages: list[ChatMessage] = []
    for item in items:
        if item.type == "message":
            messages.append(ChatMessage("system" if item.role == "developer" else str(item.role), item.text()))
        elif item.type == "function_call":
            call = ToolCall(str(item.call_id), str(item.name), _arguments(item.arguments or ""))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = ChatMessage("assistant", last.content, (*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", "", (call,)))
        else:
            messages.append(ChatMessage("tool", _text(item.output), tool_call_id=item.call_id))
    return messages


def _arguments(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"invalid_arguments": raw}


async def _parse(request: Request) -> ResponseIn:
    """OpenAI answers a bad request with 400, so this route validates by hand instead of FastAPI's 422."""
    try:
        raw = await request.json()
    except UnusableBody as exc:
        raise InvalidInput(str(exc.detail)) from None
    try:
        return ResponseIn.model_validate(raw)
    except ValidationError as exc:
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(summary) from None


# --- the response object ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseRef:
    """What a response id names: a run, and for a run resumed by the client's results, the first
    call (by id) this response's request answered: the response is what the run did after it."""

    run_id: str
    answered: str | None = None

    @property
    def id(self) -> str:
        return ID_PREFIX + self.run_id + (f"-{self.answered}" if self.answered else "")

    @staticmethod
    def parse(resp_id: str) -> ResponseRef:
        run_id, _, answered = resp_id.removeprefix(ID_PREFIX).partition("-")
        if not resp_id.startswith(ID_PREFIX) or not run_id:
            raise NotFound(f"no response {resp_id!r}")
        return ResponseRef(run_id, answered or None)


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


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    inp, out = int((usage or {}).get("input_tokens", 0)), int((usage or {}).get("output_tokens", 0))
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {"id": "fc_" + call.id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": arguments, "status": status}


def response_object(ref: ResponseRef, created_at: int, model: str, run_status: str, *,
                    output: list[dict[str, Any]] | None = None, usage: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None, request: ResponseIn | None = None) -> dict[str, Any]:
    status = _status(run_status)
    failure = None
    if status == "failed":
        code = "run_interrupted" if run_status == RunStatus.INTERRUPTED.value else "server_error"
        failure = {"code": code, "message": (error or {}).get("message") or f"the run ended {run_status}"}
    return {
        "id": ref.id, "object": "response", "created_at": created_at, "status": status,
        "model": model, "output": output or [], "usage": _usage(usage) if status == "completed" else None,
        "error": failure, "incomplete_details": None,
        "instructions": request.instructions if request else None,
        "previous_response_id": request.previous_response_id if request else None,
        "background": request.background if request else None,
        "store": request.store if request else True,
        "metadata": (request.metadata if request else None) or {},
        "parallel_tool_calls": True, "temperature": None, "top_p": None,
        "tool_choice": (request.tool_choice if isinstance(request.tool_choice, str) else "auto") if request
        else "auto",
        "tools": [t.model_dump(exclude_none=True) for t in request.tools or ()] if request else [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "reasoning": None,
        "max_output_tokens": None, "user": None,
    }


async def _read(kernel: Kernel, principal: Principal, resp_id: str) -> tuple[ResponseRef, Any, str]:
    """A response's id, its run's row (404 if not the caller's) and its model (the session's agent)."""
    ref = ResponseRef.parse(resp_id)
    row = await owned_run(kernel, principal, ref.run_id)
    session = await kernel.store.read(repo.get_session, row.session_id)
    return ref, row, session.agent if session is not None else ""


# --- the stream ----------------------------------------------------------------------------------------


class _Frames:
    """The Responses event sequence of one response, numbered from 0, built from its run's events
    alone: a replay gives the same frames. ``final`` is the response once it has ended: the run
    ended, or parked waiting for the client's results of its calls of the client's tools."""

    def __init__(self, ref: ResponseRef, created_at: int, model: str, request: ResponseIn | None):
        self.ref, self.created_at, self.model, self.request = ref, created_at, model, request
        self.seq = -1
        self.text = ""
        self.started = False
        self.skipping = ref.answered is not None  # the run's events up to this response's results
        self.item_id = "msg_" + ref.id.removeprefix(ID_PREFIX)
        self.final: dict[str, Any] | None = None

    def _frame(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def object(self, run_status: str, **kw: Any) -> dict[str, Any]:
        return response_object(self.ref, self.created_at, self.model, run_status, request=self.request, **kw)

    def opening(self) -> Iterator[dict[str, Any]]:
        yield self._frame("response.created", response=self.object(RunStatus.RUNNING.value))
        yield self._frame("response.in_progress", response=self.object(RunStatus.RUNNING.value))

    def _start(self) -> Iterator[dict[str, Any]]:
        if not self.started:
            self.started = True
            yield self._frame("response.output_item.added", output_index=0,
                              item={**_message_item(self.item_id, "", "in_progress"), "content": []})
            yield self._frame("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def _finish(self, text: str, status: str) -> Iterator[dict[str, Any]]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        yield self._frame("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                          text=text, logprobs=[])
        yield self._frame("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                          part=part)
        yield self._frame("response.output_item.done", output_index=0,
                          item=_message_item(self.item_id, text, status))

    def _calls(self, calls: list[ToolCall], usage: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        output: list[dict[str, Any]] = []
        if self.started:
            yield from self._finish(self.text, "completed")
            output.append(_message_item(self.item_id, self.text, "completed"))
        for call in calls:
            index, arguments = len(output), json.dumps(call.arguments)
            item_id = "fc_" + call.id
            yield self._frame("response.output_item.added", output_index=index,
                              item=_call_item(call, "", "in_progress"))
            yield self._frame("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                              delta=arguments)
            yield self._frame("response.function_call_arguments.done", item_id=item_id, output_index=index,
                              arguments=arguments, name=call.name)
            output.append(_call_item(call, arguments, "completed"))
            yield self._frame("response.output_item.done", output_index=index, item=output[-1])
        self.final = self.object(RunStatus.COMPLETED.value, output=output, usage=usage)
        yield self._frame("response.completed", response=self.final)

    def of(self, event: Event) -> Iterator[dict[str, Any]]:
        if self.final is not None:
            return
        if self.skipping:
            if event.type == EventType.TOOL_COMPLETED and event.data.get("call_id") == self.ref.answered:
                self.skipping = False
            if not event.is_terminal:
                return
        if event.type == EventType.MESSAGE_DELTA:
            yield from self._start()
            self.text += event.data["text"]
            yield self._frame("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                              delta=event.data["text"], logprobs=[])
        elif event.type == EventType.RUN_WAITING and event.data.get("client_calls"):
            calls = [ToolCall.from_json(c) for c in event.data["client_calls"]]
            yield from self._calls(calls, event.data.get("usage"))
        elif event.type == EventType.MESSAGE_COMPLETED and event.data.get("tool_calls"):
            # A step that called tools: what it said goes with its calls, not with the final answer.
            self.text = event.data.get("content") or ""
        elif event.is_terminal:
            data = event.data
            status = data.get("status", RunStatus.FAILED.value)
            if status == RunStatus.COMPLETED.value:
                text = data.get("output") or self.text
                yield from self._start()
                yield from self._finish(text, "completed")
                self.final = self.object(status, output=[_message_item(self.item_id, text, "completed")],
                                         usage=data.get("usage"))
                yield self._frame("response.completed", response=self.final)
            else:
                if self.started:
                    yield from self._finish(self.text, "incomplete")
                self.final = self.object(status, error=data.get("error"))
                yield self._frame("response.failed", response=self.final)


async def _stream(kernel: Kernel, session_id: str, frames: _Frames, *, starting_after: int = -1,
                  cancel_on_hangup: bool = False) -> AsyncIterator[dict[str, str]]:
    def sse(frame: dict[str, Any]) -> dict[str, str]:
        return {"event": frame["type"], "data": json.dumps(frame)}

    finished = False
    try:
        for frame in frames.opening():
            if frame["sequence_number"] > starting_after:
                yield sse(frame)
        async for event in kernel.hub.observe(kernel.store, session_id, run_id=frames.ref.run_id,
                                              stop=kernel.stopping):
            for frame in frames.of(event):
                if frame["sequence_number"] > starting_after:
                    yield sse(frame)
            if frames.final is not None:
                break
        finished = True
    finally:
        if not finished and cancel_on_hangup:
            kernel.cancel_soon(frames.ref.run_id, CancelMode.SOFT)  # the client went away: stop its work


async def _follow(kernel: Kernel, session_id: str, frames: _Frames) -> dict[str, Any] | None:
    """The response once it has ended (None: the server is stopping)."""
    list(frames.opening())
    async for event in kernel.hub.observe(kernel.store, session_id, run_id=frames.ref.run_id, stop=kernel.stopping):
        for _ in frames.of(event):
            pass
        if frames.final is not None:
            break
    return frames.final


async def _snapshot(kernel: Kernel, row: Any, frames: _Frames) -> dict[str, Any]:
    """The response as the run's stored events have it now."""
    list(frames.opening())
    after = 0
    while frames.final is None:
        events = await kernel.store.read(repo.events_after, row.session_id, after, run_id=row.id)
        if not events:
            break
        for event in events:
            for _ in frames.of(event):
                pass
        after = events[-1].seq
    if frames.final is not None:
        return frames.final
    status = row.status if not RunStatus(row.status).is_terminal else RunStatus.RUNNING.value
    return frames.object(status)


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
    options = model_options(body)
    items = _items(body)
    results = trailing_results(items)
    previous = None
    if body.previous_response_id is not None:
        _, previous, model = await _read(kernel, principal, body.previous_response_id)
        if model != agent.name:
            raise InvalidInput(f"previous_response_id: that response is of model {model!r}, not {agent.name!r}")
    if results:  # the client's results of a run's calls: the same run goes on
        turn = await resume_turn(kernel, principal, agent.name, results, model_options=options)
        if previous is not None and previous.session_id != turn.session_id:
            raise InvalidInput("previous_response_id: the function calls answered are not of that conversation")
        ref, session_id = ResponseRef(turn.run_id, min(turn.answered)), turn.session_id
    else:
        *earlier, last = items
        if last.type != "message" or last.role != "user":
            raise InvalidInput("input: the last item must be a user message (a new turn) or function_call_output "
                               "items (the results of the calls the last response asked for)")
        content = last.text()
        if not content.strip():
            raise InvalidInput("input: the last user message is empty")
        if previous is not None:
            if earlier:
                raise InvalidInput("input: with previous_response_id send only the new user message")
            session_id = previous.session_id
            seen = await kernel.store.input_by_key(session_id, idempotency_key) if idempotency_key else None
            if seen is None:  # not a retry: a run waiting for results the client never sent is abandoned
                await kernel.client_tools.abandon_in(session_id)
            accepted = await kernel.submit(session_id, content, origin="openai", idempotency_key=idempotency_key,
                                           model_options=options)
            run_id = accepted.run_id
        else:
            seed = history(earlier)
            if body.instructions:
                seed.insert(0, ChatMessage("system", body.instructions))
            key = CALL_SESSION_PREFIX + idempotency_key if idempotency_key is not None else None
            begun = await begin_turn(kernel, principal, agent.name, content, history=seed, key=key,
                                     model_options=options, idempotency_key=idempotency_key,
                                     metadata={"channel": "openai-responses"})
            session_id, run_id = begun.turn.session_id, begun.turn.run_id
        ref = ResponseRef(run_id)
    # The run exists: from here no answer may leave the client to start it again.
    advise(request, for_key(idempotency_key))
    headers = {"x-corral-session-id": session_id, "x-corral-run-id": ref.run_id}
    row = await kernel.store.read(repo.get_run, ref.run_id)
    assert row is not None
    frames = _Frames(ref, int(row.created_at.timestamp()), agent.name, body)
    if body.stream:
        # Background work, or a request that a retry may attach to, goes on when the client hangs up.
        hangup_cancels = not body.background and idempotency_key is None
        return EventSourceResponse(_stream(kernel, session_id, frames, cancel_on_hangup=hangup_cancels),
                                   ping=15, headers=headers | outcome_headers())
    if body.background:
        return JSONResponse(frames.object(row.status), headers=headers | outcome_headers())
    final = await _follow(kernel, session_id, frames)
    if final is not None:
        return JSONResponse(final, headers=headers | outcome_headers())
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
    ref, row, model = await _read(kernel, principal, response_id)
    frames = _Frames(ref, int(row.created_at.timestamp()), model, None)
    if not stream:
        return JSONResponse(await _snapshot(kernel, row, frames))
    return EventSourceResponse(_stream(kernel, row.session_id, frames, starting_after=starting_after), ping=15)


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(response_id: str, kernel: KernelDep, principal: PrincipalDep) -> JSONResponse:
    """The run's soft cancel, hard if its current step has not ended after ``CANCEL_GRACE_S``;
    answers once the run has ended."""
    ref, row, model = await _read(kernel, principal, response_id)
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
    return JSONResponse(await _snapshot(kernel, row, _Frames(ref, int(row.created_at.timestamp()), model, None)))
