"""The model-provider interface the step loop talks to."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.types import CallId


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: CallId
    name: str
    arguments: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolCall:
        return cls(data["id"], data["name"], dict(data.get("arguments") or {}))


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One entry of a model's context, provider-neutral."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: CallId | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallsPart:
    """The step's tool calls; a provider yields them once, after any text."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


StreamPart = TextDelta | ToolCallsPart | Usage


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One model call. ``purpose`` is ``reply`` for a turn's step and ``summary`` for a
    context compaction; real providers treat both alike, the demo model answers each in kind."""

    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = field(default_factory=tuple)
    purpose: str = "reply"


class Provider(Protocol):
    """A model client.

    ``start`` is the driver handshake and may be slow: the agent manager runs it in the
    background. ``stream`` must be cancellable at every await (a hard cancel aborts it),
    and raises :class:`corral.errors.ProviderError` for the provider's own failures.
    """

    name: str
    max_concurrent_calls: int

    async def start(self) -> None: ...

    def stream(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]: ...

    async def aclose(self) -> None: ...


async def reply_text(provider: Provider, request: ModelRequest) -> tuple[str, Usage]:
    """The whole text of a reply that needs no tools (a summary, a title), and what it cost.

    The caller holds whatever slot the call needs; streamed parts are only gathered here.
    """
    parts: list[str] = []
    usage = Usage()
    async with aclosing(provider.stream(request)) as stream:
        async for part in stream:
            if isinstance(part, TextDelta):
                parts.append(part.text)
            elif isinstance(part, Usage):
                usage = Usage(usage.input_tokens + part.input_tokens, usage.output_tokens + part.output_tokens)
    return "".join(parts), usage
