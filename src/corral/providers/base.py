"""The model-provider interface the step loop talks to."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
class ToolChoice:
    """Which tools a model call may or must use: ``auto`` (its choice), ``none`` (no tool),
    ``required`` (at least one), or ``function`` (the tool ``name``)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None

    @property
    def forces(self) -> bool:
        """Whether it makes the model call a tool (so it binds one model call, not a whole run)."""
        return self.mode in ("required", "function")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the reply's text must be: JSON following ``schema`` (``json_schema``), or any JSON
    object (``json_object``)."""

    type: Literal["json_schema", "json_object"]
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """What a client's request adds to the model calls of its run (the OpenAI endpoints): tools
    of its own, which the client runs (a call to one parks the run until the client sends the
    result), ``tool_choice`` and ``response_format``. Stored with the run, as ``as_json``."""

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    @property
    def tool_names(self) -> frozenset[str]:
        return frozenset(spec.name for spec in self.tools)

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"tools": [{"name": s.name, "description": s.description, "parameters": s.parameters}
                                          for s in self.tools]}
        if self.tool_choice is not None:
            data["tool_choice"] = {"mode": self.tool_choice.mode, "name": self.tool_choice.name}
        if self.response_format is not None:
            f = self.response_format
            data["response_format"] = {"type": f.type, "name": f.name, "schema": f.schema, "strict": f.strict,
                                       "description": f.description}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ModelOptions | None:
        if data is None:
            return None
        tools = tuple(ToolSpec(t["name"], t.get("description") or "", dict(t.get("parameters") or {}))
                      for t in data.get("tools") or ())
        choice = data.get("tool_choice")
        fmt = data.get("response_format")
        return cls(
            tools,
            ToolChoice(choice["mode"], choice.get("name")) if choice else None,
            ResponseFormat(fmt["type"], fmt.get("name") or "response", fmt.get("schema"), fmt.get("strict"),
                           fmt.get("description")) if fmt else None,
        )


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
    context compaction; real providers treat both alike, the demo model answers each in kind.
    ``tool_choice`` and ``response_format`` come from a client's request (``ModelOptions``)."""

    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = field(default_factory=tuple)
    purpose: str = "reply"
    # None: the provider's default (``auto`` when there are tools).
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None


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
