"""The tool interface and the registry agents pick their tools from."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from corral.errors import InvalidInput, ToolError
from corral.providers.base import ToolSpec


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call it serves.

    ``workspace`` is the agent's own directory: file and process tools must stay inside
    it (it may not exist yet; a tool that needs it creates it).
    """

    run_id: str
    session_id: str
    agent: str
    workspace: Path


ToolFn = Callable[[Any, ToolContext], Awaitable[str]]


@dataclass(frozen=True)
class Tool:
    """A named function the model can call.

    ``args`` is a pydantic model: it is both the JSON schema the model sees and the
    validator of what the model sent. ``spawns_process`` tools take a slot of the
    tool-process semaphore while they run; in-process tools do not.
    """

    name: str
    description: str
    args: type[BaseModel]
    fn: ToolFn
    spawns_process: bool = False

    def spec(self) -> ToolSpec:
        # Generating a JSON schema is costly and the answer never changes: compute it once.
        return _spec(self.name, self.description, self.args)

    async def call(self, arguments: dict[str, Any], context: ToolContext) -> str:
        try:
            parsed = self.args.model_validate(arguments)
        except ValidationError as exc:
            raise ToolError(f"bad arguments for {self.name}: {exc.errors(include_url=False)}") from exc
        return await self.fn(parsed, context)


class AnyArguments(BaseModel):
    """Any JSON object: the ``args`` of a tool whose schema is checked by someone else."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class JsonSchemaTool(Tool):
    """A tool whose schema arrives as JSON (an MCP server's ``inputSchema``), not as a model.

    The model sees ``parameters`` as is, and ``fn`` receives the arguments as a plain dict:
    whoever published the schema (the MCP server) validates them, so Corral does not
    second-guess a schema it did not write. ``args`` is ``AnyArguments``.
    """

    parameters: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    async def call(self, arguments: dict[str, Any], context: ToolContext) -> str:
        return await self.fn(dict(arguments), context)


@functools.cache
def _spec(name: str, description: str, args: type[BaseModel]) -> ToolSpec:
    return ToolSpec(name, description, args.model_json_schema())


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def __repr__(self) -> str:
        return f"<ToolRegistry {sorted(self._tools)}>"

    def add(self, tool: Tool) -> None:
        self._tools[tool.name] = tool

    def names(self) -> list[str]:
        return sorted(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def select(self, names: Iterable[str]) -> dict[str, Tool]:
        chosen: dict[str, Tool] = {}
        for name in names:
            tool = self._tools.get(name)
            if tool is None:
                raise InvalidInput(f"unknown tool {name!r}; available: {', '.join(self.names())}")
            chosen[name] = tool
        return chosen
