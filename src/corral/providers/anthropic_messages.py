"""Provider ``anthropic``: the Messages API through the official SDK.

Corral's context is OpenAI-shaped (system messages, tool messages); the Messages API wants
one system prompt, alternating user/assistant turns, ``tool_use`` blocks on the assistant
side and ``tool_result`` blocks on the user side. ``_to_messages`` converts, merging
neighbours of the same role.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import anthropic
from anthropic.types import (
    InputJSONDelta,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    ToolUseBlock,
)
from anthropic.types import TextDelta as TextDelta_

from corral.errors import ProviderError, ProviderUnavailable
from corral.providers.base import (
    ChatMessage,
    ModelRequest,
    StreamPart,
    TextDelta,
    ToolCall,
    ToolCallsPart,
    ToolChoice,
    Usage,
)
from corral.providers.remote import RemoteProvider, ToolNames, classify, parse_arguments

DEFAULT_MAX_TOKENS = 4096


@dataclass
class _PartialUse:
    id: str
    name: str
    json: str = ""


class AnthropicProvider(RemoteProvider[anthropic.AsyncAnthropic]):
    name = "anthropic"

    async def start(self) -> None:
        self._client = anthropic.AsyncAnthropic(
            api_key=self.options.resolve_key("ANTHROPIC_API_KEY"),
            base_url=self.options.base_url,
            timeout=self.options.timeout_s,
            max_retries=0,
        )

    async def _attempt(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        names = ToolNames(spec.name for spec in request.tools)
        system, messages = _to_messages(request.messages, names)
        extra: dict[str, Any] = {}
        if system:
            extra["system"] = system
        if request.tools:
            extra["tools"] = [{"name": names.outgoing(s.name), "description": s.description,
                               "input_schema": s.parameters} for s in request.tools]
            if request.tool_choice is not None:
                extra["tool_choice"] = _tool_choice(request.tool_choice, names)
        if request.response_format is not None and request.response_format.type == "json_schema":
            # Structured outputs: the reply's text is JSON that follows the schema. ``json_object``
            # has no counterpart in the Messages API and is not passed on.
            extra["output_config"] = {"format": {"type": "json_schema",
                                                 "schema": request.response_format.schema or {}}}
        if self.options.temperature is not None:
            extra["temperature"] = self.options.temperature
        uses: dict[int, _PartialUse] = {}
        input_tokens = output_tokens = 0
        finished = False
        try:
            # The SDK's overloads want TypedDicts; these dicts have exactly those shapes.
            create: Any = self.client.messages.create
            stream: anthropic.AsyncStream[RawMessageStreamEvent] = await create(
                model=self.model, max_tokens=self.options.max_tokens or DEFAULT_MAX_TOKENS,
                messages=messages, stream=True, **extra,
            )
            async with stream:
                async for event in stream:
                    if isinstance(event, RawMessageStartEvent):
                        input_tokens = event.message.usage.input_tokens
                    elif isinstance(event, RawContentBlockStartEvent) and isinstance(event.content_block, ToolUseBlock):
                        block = event.content_block
                        uses[event.index] = _PartialUse(block.id, names.incoming(block.name))
                    elif isinstance(event, RawContentBlockDeltaEvent):
                        if isinstance(event.delta, TextDelta_):
                            yield TextDelta(event.delta.text)
                        elif isinstance(event.delta, InputJSONDelta) and event.index in uses:
                            uses[event.index].json += event.delta.partial_json
                    elif isinstance(event, RawMessageDeltaEvent):
                        output_tokens = event.usage.output_tokens
                    elif isinstance(event, RawMessageStopEvent):
                        finished = True
        except anthropic.APIError as exc:
            raise _translate(exc) from exc
        if not finished:  # a clean end of the body, but not of the reply: a proxy cut it short
            raise ProviderUnavailable("anthropic: the stream ended before the reply did (no message_stop)")
        if uses:
            yield ToolCallsPart(tuple(_finish(use) for _, use in sorted(uses.items())))
        yield Usage(input_tokens, output_tokens)


def _to_messages(messages: Sequence[ChatMessage], names: ToolNames) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for message in messages:
        if message.role == "system":
            system.append(message.content)
        elif message.role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}])
        elif message.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
            blocks += [{"type": "tool_use", "id": c.id, "name": names.outgoing(c.name), "input": c.arguments}
                       for c in message.tool_calls]
            if blocks:
                add("assistant", blocks)
        else:
            add("user", [{"type": "text", "text": message.content}])
    return "\n\n".join(system), turns


def _tool_choice(choice: ToolChoice, names: ToolNames) -> dict[str, Any]:
    """OpenAI's choices in the Messages API's words: ``required`` is ``any``, a function is a ``tool``."""
    if choice.mode == "function" and choice.name is not None:
        return {"type": "tool", "name": names.outgoing(choice.name)}
    return {"type": "any" if choice.mode == "required" else choice.mode}


def _finish(use: _PartialUse) -> ToolCall:
    return ToolCall(use.id, use.name, parse_arguments(use.json))


def _translate(exc: anthropic.APIError) -> ProviderError:
    if isinstance(exc, anthropic.APIConnectionError):
        return classify("anthropic", status=None, message=f"{type(exc.__cause__ or exc).__name__}: {exc}",
                        connection=True)
    if isinstance(exc, anthropic.APIStatusError):
        return classify("anthropic", status=exc.status_code, message=exc.message,
                        retry_after=exc.response.headers.get("retry-after"))
    return classify("anthropic", status=None, message=exc.message)
