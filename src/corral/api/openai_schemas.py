"""The OpenAI chat-completions wire format, as much of it as Corral speaks.

A request's ``tools``, ``tool_choice`` and ``response_format`` are the client's own
(``api/chat_tools.py``); other unknown request fields (temperature, parallel_tool_calls, ...)
are accepted and ignored: the agent's own configuration decides how it answers.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.api.errors import error_body
from corral.errors import InvalidInput
from corral.providers.base import ToolCall
from corral.types import RunStatus


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128)
    arguments: str = ""  # JSON text, as the model wrote it


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, as the client sends its history back."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    # An assistant's calls of the client's tools; a tool message's call (its result is the content).
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=64)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        unsupported = sorted({part.type for part in self.content if part.type != "text"})
        if unsupported:
            raise InvalidInput(f"content parts of type {', '.join(unsupported)} are not supported; send text")
        return "".join(part.text or "" for part in self.content)


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolIn(BaseModel):
    """One of the client's own tools: the model may call it; the client runs it."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionIn


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)


class ToolChoiceIn(BaseModel):
    """``{"type": "function", "function": {"name": ...}}`` (or the Responses API's flat ``name``)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: NamedFunction | None = None
    name: str | None = None


class JsonSchemaIn(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int = 1
    tools: list[ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceIn | None = None
    response_format: ResponseFormatIn | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: an agent gives one answer")
        return n


# How an ended run that did not complete is reported to an OpenAI client: (status, code).
UNFINISHED = {
    RunStatus.FAILED.value: (502, "run_failed"),
    RunStatus.CANCELLED.value: (409, "run_cancelled"),
    RunStatus.INTERRUPTED.value: (409, "run_interrupted"),
}


def run_error(code: str, status: str, error: dict[str, Any] | None) -> dict[str, Any]:
    message = (error or {}).get("message") or f"the run ended {status}"
    return error_body(code, message, type="server_error", param=None)


def completion(run_id: str, model: str, created: int, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{run_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": openai_usage(usage),
    }


def tool_calls_completion(turn_id: str, model: str, created: int, text: str, calls: list[ToolCall],
                          usage: dict[str, Any] | None) -> dict[str, Any]:
    """The answer of a run that waits for the results of the client's tool ``calls``."""
    message = {"role": "assistant", "content": text or None, "tool_calls": [tool_call(call) for call in calls]}
    return {
        "id": f"chatcmpl-{turn_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}],
        "usage": openai_usage(usage),
    }


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}


def chunk(
    run_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{run_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage
    return body


def openai_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    prompt = int((usage or {}).get("input_tokens", 0))
    completion_tokens = int((usage or {}).get("output_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "corral"}
