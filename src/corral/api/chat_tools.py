"""Client tools on chat completions: a request's own ``tools``, its ``tool_choice`` and
``response_format``, the ``tool_calls`` it gets back, and the results its next request sends.

A request that brings any of those (or a history with tool calls) is served here, through the
endpoint-neutral turns of ``api/turns.py``:

- its tools are offered to the model for that run beside the agent's own; when the model calls
  one, the run parks (``waiting``, holding no slot) and the answer is the calls:
  ``finish_reason: "tool_calls"`` and ``message.tool_calls`` (streamed as OpenAI streams them: a
  first delta per call with its id and name, then its arguments);
- a request whose messages end with ``role: tool`` results resumes the run that made those
  calls, found by their ids (with or without a pinned session), and is answered with what the
  same run does next;
- ``response_format`` (``json_schema`` or ``json_object``) goes to the model with every call of
  the run (a real provider's structured output; the demo model answers with the smallest
  instance of the schema).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from corral.api.openai_schemas import (
    UNFINISHED,
    ChatCompletionIn,
    ChatMessageIn,
    ToolChoiceIn,
    chunk,
    completion,
    openai_usage,
    run_error,
    tool_calls_completion,
)
from corral.api.retry_advice import advice_headers, advise, for_key, outcome_headers
from corral.api.turns import Turn, TurnCalls, TurnEnded, TurnEvent, TurnText, begin_turn, follow, resume_turn
from corral.errors import InvalidInput
from corral.kernel import Kernel
from corral.principals import Principal
from corral.providers.base import ChatMessage, ModelOptions, ResponseFormat, ToolCall, ToolChoice, ToolSpec
from corral.types import CancelMode, RunStatus


def uses_client_tools(body: ChatCompletionIn) -> bool:
    """Whether the request brings tools, a tool choice or a response format of its own, or a
    history with tool calls: this module serves it."""
    structured = body.response_format is not None and body.response_format.type != "text"
    return bool(body.tools) or body.tool_choice is not None or structured or any(
        m.role == "tool" or m.tool_calls for m in body.messages)


def model_options(body: ChatCompletionIn) -> ModelOptions | None:
    """What the request adds to its run's model calls; 400 for a choice of a tool it did not bring."""
    tools = tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ())
    names = {spec.name for spec in tools}
    if len(names) != len(tools):
        raise InvalidInput("tools: two tools have the same name")
    choice = _tool_choice(body.tool_choice, names)
    fmt = body.response_format
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = ResponseFormat("json_object")
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidInput("response_format: type json_schema needs a json_schema")
        spec = fmt.json_schema
        response_format = ResponseFormat("json_schema", spec.name, spec.json_schema, spec.strict, spec.description)
    if not tools and choice is None and response_format is None:
        return None
    return ModelOptions(tools, choice, response_format)


def _tool_choice(raw: str | ToolChoiceIn | None, names: set[str]) -> ToolChoice | None:
    if raw is None:
        return None
    if isinstance(raw, ToolChoiceIn):
        name = raw.function.name if raw.function is not None else raw.name
        if name is None:
            raise InvalidInput("tool_choice: a function choice needs the function's name")
        if name not in names:
            raise InvalidInput(f"tool_choice: no tool named {name!r} in tools")
        return ToolChoice("function", name)
    if raw == "required" and not names:
        raise InvalidInput("tool_choice: 'required' needs tools")
    if raw == "auto":
        return ToolChoice("auto")
    return ToolChoice("none") if raw == "none" else ToolChoice("required")


def history_message(message: ChatMessageIn) -> ChatMessage:
    """A request's message as a model's context has it (a developer message is a system one)."""
    role = "system" if message.role == "developer" else message.role
    if role == "tool":
        if message.tool_call_id is None:
            raise InvalidInput("a message with role 'tool' needs its tool_call_id")
        return ChatMessage("tool", message.text(), tool_call_id=message.tool_call_id)
    calls = tuple(ToolCall(c.id, c.function.name, _arguments(c.function.arguments)) for c in message.tool_calls or ())
    return ChatMessage(role, message.text(), calls)


def _arguments(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"invalid_arguments": raw}


def _check_results(messages: list[ChatMessageIn]) -> None:
    """Each tool message answers a call of an earlier assistant message (as OpenAI requires)."""
    called: set[str] = set()
    for message in messages:
        called.update(call.id for call in message.tool_calls or ())
        if message.role == "tool" and message.tool_call_id not in called:
            raise InvalidInput(f"a message with role 'tool' must answer a tool call of an earlier assistant message "
                               f"(tool_call_id {message.tool_call_id!r})")


def trailing_results(messages: list[ChatMessageIn]) -> dict[str, str]:
    """The tool results the messages end with (call id -> text): the client's answer to a run's calls."""
    start = len(messages)
    while start and messages[start - 1].role == "tool":
        start -= 1
    results: dict[str, str] = {}
    for message in messages[start:]:
        if message.tool_call_id is None:
            raise InvalidInput("a message with role 'tool' needs its tool_call_id")
        results.setdefault(message.tool_call_id, message.text())
    return results


async def client_tools_completion(request: Request, kernel: Kernel, principal: Principal, agent: str,
                                  body: ChatCompletionIn, *, pin: str | None, call_session: str | None,
                                  idempotency_key: str | None) -> JSONResponse | EventSourceResponse:
    """``POST /v1/chat/completions`` for a request that ``uses_client_tools``. ``pin``: the session
    key the client named (``X-Corral-Session`` or ``user``); ``call_session``: the session key of an
    unpinned call with an Idempotency-Key, so that its retry finds it."""
    options = model_options(body)
    _check_results(body.messages)
    results = trailing_results(body.messages)
    if results:
        turn = await resume_turn(kernel, principal, agent, results, key=pin, model_options=options)
    else:
        *earlier, last = body.messages
        if last.role != "user":
            raise InvalidInput("the last message must have role 'user' (a new turn) or 'tool' (the results of "
                               "the tool calls the last answer asked for)")
        content = last.text()
        if not content.strip():
            raise InvalidInput("the last user message is empty")
        begun = await begin_turn(kernel, principal, agent, content, history=[history_message(m) for m in earlier],
                                 key=pin or call_session, model_options=options, idempotency_key=idempotency_key)
        turn = begun.turn
    # The run exists: from here no answer may leave the client to start it again.
    advise(request, for_key(idempotency_key))
    headers = {"x-corral-session-id": turn.session_id, "x-corral-run-id": turn.run_id}
    created = int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        frames = _frames(kernel, turn, agent, created, include_usage, cancel_on_hangup=idempotency_key is None)
        return EventSourceResponse(frames, ping=15, headers=headers | outcome_headers())
    outcome: TurnEvent | None = None
    async for event in follow(kernel, turn):
        outcome = event
    if isinstance(outcome, TurnCalls):
        answer = tool_calls_completion(turn.id, agent, created, outcome.text, outcome.calls, outcome.usage)
        return JSONResponse(answer, headers=headers | outcome_headers())
    if isinstance(outcome, TurnEnded) and outcome.status is RunStatus.COMPLETED:
        answer = completion(turn.id, agent, created, outcome.output or "", outcome.usage)
        return JSONResponse(answer, headers=headers | outcome_headers())
    if isinstance(outcome, TurnEnded) and outcome.status.value in UNFINISHED:
        status, code = UNFINISHED[outcome.status.value]
        return JSONResponse(run_error(code, outcome.status.value, outcome.error), status_code=status,
                            headers=headers | outcome_headers())
    # Not ended: the server is stopping. With a key a retry finds the run wherever it resumes.
    return JSONResponse(run_error("run_unfinished", "unfinished", None), status_code=503,
                        headers=headers | advice_headers(request))


async def _frames(kernel: Kernel, turn: Turn, model: str, created: int, include_usage: bool, *,
                  cancel_on_hangup: bool) -> AsyncIterator[dict[str, str]]:
    def frame(delta: dict[str, Any], finish: str | None = None) -> dict[str, str]:
        return {"data": json.dumps(chunk(turn.id, model, created, delta, finish_reason=finish))}

    def usage_frame(usage: dict[str, Any] | None) -> dict[str, str]:
        return {"data": json.dumps(chunk(turn.id, model, created, {}, usage=openai_usage(usage)))}

    finished = False
    try:
        yield frame({"role": "assistant", "content": ""})
        async for event in follow(kernel, turn):
            if isinstance(event, TurnText):
                yield frame({"content": event.text})
            elif isinstance(event, TurnCalls):
                for index, call in enumerate(event.calls):  # as OpenAI streams them: id and name, then arguments
                    yield frame({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                                 "function": {"name": call.name, "arguments": ""}}]})
                    yield frame({"tool_calls": [{"index": index,
                                                 "function": {"arguments": json.dumps(call.arguments)}}]})
                yield frame({}, "tool_calls")
                if include_usage:
                    yield usage_frame(event.usage)
            elif event.status is RunStatus.COMPLETED:
                yield frame({}, "stop")
                if include_usage:
                    yield usage_frame(event.usage)
            else:
                _, code = UNFINISHED.get(event.status.value, (503, "run_unfinished"))
                yield {"data": json.dumps(run_error(code, event.status.value, event.error))}
        finished = True
        yield {"data": "[DONE]"}
    finally:
        if not finished and cancel_on_hangup:
            # The client went away (or the server is stopping): stop the work it asked for.
            kernel.cancel_soon(turn.run_id, CancelMode.SOFT)
