"""The embedded demo model: a deterministic test double for an LLM.

It needs no network, so ``corral serve`` works on a fresh machine and every test and
benchmark is repeatable. It echoes the user's turn and obeys directives found on the
first line of the turn's first message (DESIGN.md section 4):

``/sleep S``, ``/tool NAME {json}`` (one line per parallel call; a ``/next`` line starts
the next step), ``/steps N MS``,
``/spawn TEXT``, ``/fail``, and ``/recall`` (lists the user messages of earlier turns,
so a test can see what context a conversation kept). Asked for a compaction summary, it
lists what the user said.

A client's request (the OpenAI endpoints) may add ``tool_choice`` and ``response_format``
(``_obey_request``): ``none`` makes it call no tool; ``required`` and a named function make it
call one before the turn has any tool result, with the smallest instance of the tool's
parameters schema unless a ``/tool`` line gives the arguments; a JSON schema makes its text
reply the smallest instance of that schema, and ``json_object`` makes it ``{"echo": TEXT}``.
Call ids are ``call_<tag><n>_<i>``, with a tag drawn per provider, so a call id stays unique
across restarts (clients send results back by call id).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import InvalidInput, ProviderError
from corral.providers.base import (
    ChatMessage,
    ModelRequest,
    StreamPart,
    TextDelta,
    ToolCall,
    ToolCallsPart,
    Usage,
)
from corral.providers.json_instance import minimal_instance


class DemoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(0, ge=0, description="delay before the first token")
    token_ms: float = Field(0, ge=0, description="delay between tokens; 0 sends the reply as one delta")
    startup_ms: float = Field(0, ge=0, description="how long the agent's start takes")
    max_concurrent_calls: int = Field(1000, ge=1)


@dataclass(frozen=True)
class _Turn:
    """The messages since the model's last final answer."""

    users: list[str]
    directive: str | None
    after_directive: list[ChatMessage]
    earlier_users: list[str]
    # The tool results of the turn so far.
    results: list[ChatMessage]


def _current_turn(messages: Sequence[ChatMessage]) -> _Turn:
    start = 0
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.tool_calls:
            start = index + 1
    turn = list(messages[start:])
    users = [m.content for m in turn if m.role == "user"]
    earlier = [m.content for m in messages[:start] if m.role == "user"]
    results = [m for m in turn if m.role == "tool"]
    for index, message in enumerate(turn):
        if message.role == "user":
            first_line = message.content.strip().splitlines()[0] if message.content.strip() else ""
            if first_line.startswith("/"):
                return _Turn(users, message.content.strip(), turn[index + 1 :], earlier, results)
            break
    return _Turn(users, None, [], earlier, results)


class DemoProvider:
    """Streams ``echo: <text>`` word by word; see the module docstring for directives."""

    name = "demo"

    def __init__(self, options: DemoOptions):
        self.options = options
        self.max_concurrent_calls = options.max_concurrent_calls
        self._calls = 0
        self._tag = secrets.token_hex(4)  # call ids unique across providers and restarts

    def __repr__(self) -> str:
        return f"<DemoProvider latency_ms={self.options.latency_ms} calls={self._calls}>"

    async def start(self) -> None:
        if self.options.startup_ms:
            await asyncio.sleep(self.options.startup_ms / 1000)

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        self._calls += 1
        if request.purpose == "reflection":  # the reflector asks for a session's title or summary
            yield TextDelta(_reflection(request.messages))
            yield Usage(input_tokens=sum(len(m.content.split()) for m in request.messages), output_tokens=1)
            return
        if request.purpose == "summary":
            yield TextDelta(_summary(request.messages))
            yield Usage(input_tokens=sum(len(m.content.split()) for m in request.messages), output_tokens=1)
            return
        turn = _current_turn(request.messages)
        if self.options.latency_ms:
            await asyncio.sleep(self.options.latency_ms / 1000)
        calls, text = _obey_request(request, turn, *self._respond(turn), f"{self._tag}{self._calls}")
        if calls:
            yield ToolCallsPart(tuple(calls))
        else:
            if turn.directive and turn.directive.startswith("/sleep"):
                await asyncio.sleep(_sleep_seconds(turn.directive))
            async for part in self._stream_text(text):
                yield part
        prompt_words = sum(len(m.content.split()) for m in request.messages)
        yield Usage(input_tokens=prompt_words, output_tokens=len(text.split()) + len(calls))

    async def _stream_text(self, text: str) -> AsyncGenerator[TextDelta, None]:
        if not self.options.token_ms:
            yield TextDelta(text)
            return
        words = text.split(" ")
        for index, word in enumerate(words):
            if index:
                await asyncio.sleep(self.options.token_ms / 1000)
            yield TextDelta(word if index == 0 else " " + word)

    def _respond(self, turn: _Turn) -> tuple[list[ToolCall], str]:
        echo = "echo: " + "\n".join(turn.users)
        directive = turn.directive
        if directive is None:
            if turn.results:  # a tool the request forced (``_obey_request``) has answered
                return [], "tool results: " + "; ".join(r.content for r in turn.results)
            return [], echo
        head = directive.split(maxsplit=1)[0]
        results = [m for m in turn.after_directive if m.role == "tool"]
        steps_done = sum(1 for m in turn.after_directive if m.role == "assistant" and m.tool_calls)
        if head == "/fail":
            raise ProviderError("the demo model was told to fail (/fail)")
        if head == "/recall":
            return [], "recall: " + json.dumps(turn.earlier_users)
        if head == "/tool":
            steps = _parse_tool_steps(directive, f"{self._tag}{self._calls}")
            if steps_done >= len(steps):
                return [], "tool results: " + "; ".join(r.content for r in results)
            return steps[steps_done], ""
        if head == "/spawn":
            if steps_done:
                return [], "subagent: " + "; ".join(r.content for r in results)
            task = directive[len("/spawn") :].strip()
            return [ToolCall(f"call_{self._tag}{self._calls}_0", "spawn_subagent", {"task": task})], ""
        if head == "/steps":
            count, wait_ms = _parse_steps(directive)
            if steps_done < count:
                return [ToolCall(f"call_{self._tag}{self._calls}_0", "wait", {"ms": wait_ms})], ""
            steers = [m.content for m in turn.after_directive if m.role == "user"]
            return [], f"done {count} steps; steering seen: {json.dumps(steers)}"
        return [], echo


def _obey_request(request: ModelRequest, turn: _Turn, calls: list[ToolCall], text: str,
                  call_number: str) -> tuple[list[ToolCall], str]:
    """What a client's ``tool_choice`` and ``response_format`` make of the directed reply."""
    choice = request.tool_choice
    if choice is not None and choice.mode == "none":
        calls = []
        text = text or "echo: " + "\n".join(turn.users)
    elif choice is not None and choice.forces and not turn.results and request.tools:
        name = choice.name if choice.mode == "function" and choice.name else (
            calls[0].name if calls else request.tools[0].name)
        chosen = [c for c in calls if c.name == name]
        if not chosen:
            explicit = _arguments_for(turn.directive, name) if turn.directive else None
            spec = next((s for s in request.tools if s.name == name), None)
            arguments = explicit if explicit is not None else minimal_instance(spec.parameters) if spec else {}
            chosen = [ToolCall(f"call_{call_number}_0", name, arguments if isinstance(arguments, dict) else {})]
        calls = chosen if choice.mode == "function" else (calls or chosen)
    if calls or request.response_format is None:
        return calls, text
    if request.response_format.type == "json_object":
        return [], json.dumps({"echo": text})
    return [], json.dumps(minimal_instance(request.response_format.schema or {}))


def _arguments_for(directive: str, name: str) -> dict[str, object] | None:
    """The arguments of the first ``/tool NAME`` line of ``directive``, if it has one."""
    for step in _parse_tool_steps(directive, "x"):
        for call in step:
            if call.name == name:
                return call.arguments
    return None


def _summary(messages: Sequence[ChatMessage]) -> str:
    """A deterministic stand-in for a summary: the first words of what the user said, oldest
    first, after any earlier summary (so a test can see compactions roll forward)."""
    earlier = [m.content.split("\n", 1)[1] for m in messages if m.role == "system" and m.content.startswith("Summary")]
    users = [m.content for m in messages[:-1] if m.role == "user"]  # the last one is the instruction
    return " | ".join(earlier + [f"user said: {' '.join(text.split()[:3])}" for text in users])


def _reflection(messages: Sequence[ChatMessage]) -> str:
    """A title is the first user message's first words; a summary counts the user's messages."""
    users = [m.content for m in messages[:-1] if m.role == "user"]
    if "title" in messages[-1].content.lower():
        return " ".join(users[0].split()[:6]) if users else "an empty conversation"
    return f"{len(users)} user messages; the latest: {users[-1][:80] if users else ''}"


def _sleep_seconds(directive: str) -> float:
    parts = directive.split()
    try:
        return float(parts[1])
    except (IndexError, ValueError):
        raise ProviderError("usage: /sleep SECONDS") from None


def _parse_steps(directive: str) -> tuple[int, float]:
    parts = directive.split()
    try:
        wait_ms = float(parts[2]) if len(parts) > 2 else 0.0
        return int(parts[1]), int(wait_ms) if wait_ms.is_integer() else wait_ms
    except (IndexError, ValueError):
        raise ProviderError("usage: /steps N MS") from None


def _parse_tool_steps(directive: str, call_number: str) -> list[list[ToolCall]]:
    """``/tool`` lines are parallel calls of one step; a ``/next`` line starts the next step."""
    steps: list[list[ToolCall]] = [[]]
    for line in directive.splitlines():
        line = line.strip()
        if line == "/next":
            steps.append([])
            continue
        if not line.startswith("/tool"):
            continue
        calls = steps[-1]
        parts = line.split(maxsplit=2)
        if len(parts) < 2:
            raise ProviderError("usage: /tool NAME {json}")
        try:
            arguments = json.loads(parts[2]) if len(parts) > 2 else {}
        except json.JSONDecodeError as exc:
            raise ProviderError(f"/tool arguments are not JSON: {exc}") from exc
        if not isinstance(arguments, dict):
            raise ProviderError("/tool arguments must be a JSON object")
        calls.append(ToolCall(f"call_{call_number}_{len(calls)}", parts[1], arguments))
    return [step for step in steps if step]


def demo_options(raw: dict[str, object]) -> DemoOptions:
    try:
        return DemoOptions.model_validate(raw)
    except ValueError as exc:
        raise InvalidInput(f"bad provider_options for the demo provider: {exc}") from exc
