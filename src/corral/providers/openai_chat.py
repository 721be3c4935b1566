"""Provider ``openai``: any server that speaks OpenAI chat completions (OpenAI, vLLM, Ollama,
llama.cpp server, or another Corral), through the official SDK.

The SDK's own retries are off: ``with_retries`` retries only before the first streamed
part and honours ``Retry-After``. A hard cancel lands inside the stream's ``async with``,
which closes the HTTP response, so the upstream sees the disconnect at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk

from corral.errors import ProviderError, ProviderUnavailable
from corral.providers.base import (
    ChatMessage,
    ModelRequest,
    ResponseFormat,
    StreamPart,
    TextDelta,
    ToolCall,
    ToolCallsPart,
    ToolChoice,
    Usage,
)
from corral.providers.remote import RemoteProvider, ToolNames, classify, parse_arguments


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


class OpenAIChatProvider(RemoteProvider[openai.AsyncOpenAI]):
    name = "openai"

    async def start(self) -> None:
        self._client = openai.AsyncOpenAI(
            api_key=self.options.resolve_key("OPENAI_API_KEY"),
            base_url=self.options.base_url,
            timeout=self.options.timeout_s,
            max_retries=0,
        )
        if self.options.check_model:
            try:
                names = [model.id async for model in self._client.models.list()]
            except openai.APIError as exc:
                raise _translate(exc) from exc
            if self.model not in names:
                raise ProviderError(f"the server does not offer model {self.model!r} (it has: {', '.join(names)})")

    async def _attempt(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        names = ToolNames(spec.name for spec in request.tools)
        extra: dict[str, Any] = {}
        if request.tools:
            extra["tools"] = [
                {"type": "function", "function": {"name": names.outgoing(spec.name), "description": spec.description,
                                                  "parameters": spec.parameters}}
                for spec in request.tools
            ]
            if request.tool_choice is not None:
                extra["tool_choice"] = _tool_choice(request.tool_choice, names)
        if request.response_format is not None:
            extra["response_format"] = _response_format(request.response_format)
        if self.options.max_tokens is not None:
            extra["max_tokens"] = self.options.max_tokens
        if self.options.temperature is not None:
            extra["temperature"] = self.options.temperature
        calls: dict[int, _PartialCall] = {}
        usage: Usage | None = None
        finished = False
        try:
            # The SDK's overloads want TypedDicts; these dicts have exactly those shapes.
            create: Any = self.client.chat.completions.create
            stream: openai.AsyncStream[ChatCompletionChunk] = await create(
                model=self.model, messages=[_message(m, names) for m in request.messages],
                stream=True, stream_options={"include_usage": True}, **extra,
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        finished = finished or choice.finish_reason is not None
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
                        for piece in choice.delta.tool_calls or ():
                            partial = calls.setdefault(piece.index, _PartialCall())
                            partial.id = piece.id or partial.id
                            if piece.function is not None:
                                partial.name += piece.function.name or ""
                                partial.arguments += piece.function.arguments or ""
        except openai.APIError as exc:
            raise _translate(exc) from exc
        if not finished:  # a clean end of the body, but not of the reply: a proxy cut it short
            raise ProviderUnavailable("openai: the stream ended before the reply did (no finish_reason)")
        if calls:
            yield ToolCallsPart(tuple(_finish(index, call, names) for index, call in sorted(calls.items())))
        if usage is not None:
            yield usage


def _message(message: ChatMessage, names: ToolNames) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": names.outgoing(call.name), "arguments": json.dumps(call.arguments)}}
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


def _tool_choice(choice: ToolChoice, names: ToolNames) -> str | dict[str, Any]:
    if choice.mode == "function" and choice.name is not None:
        return {"type": "function", "function": {"name": names.outgoing(choice.name)}}
    return choice.mode


def _response_format(fmt: ResponseFormat) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema or {}}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def _finish(index: int, call: _PartialCall, names: ToolNames) -> ToolCall:
    return ToolCall(call.id or f"call_{index}", names.incoming(call.name), parse_arguments(call.arguments))


def _translate(exc: openai.APIError) -> ProviderError:
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts and streams cut mid-way
        return classify("openai", status=None, message=f"{type(exc.__cause__ or exc).__name__}: {exc}",
                        connection=True)
    if isinstance(exc, openai.APIStatusError):
        return classify("openai", status=exc.status_code, message=exc.message,
                        retry_after=exc.response.headers.get("retry-after"))
    return classify("openai", status=None, message=exc.message)
