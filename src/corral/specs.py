"""Agent specifications: what the API accepts and the kernel runs, validated once."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.types import Approval

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# MCP server names prefix their tools (`server.tool`), so they carry no dot.
MCP_SERVER_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class AgentPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approvals: dict[str, Approval] = Field(default_factory=dict)

    def approval_for(self, tool: str) -> Approval:
        return self.approvals.get(tool, self.approvals.get("*", Approval.AUTO))


class ProviderRef(BaseModel):
    """A provider an agent falls back to when its own fails before answering."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    model: str | None = None
    provider_options: dict[str, Any] = Field(default_factory=dict)


class McpServerSpec(BaseModel):
    """An MCP server whose tools an agent may call, as ``NAME.TOOL``.

    Exactly one transport: ``command`` (a process speaking MCP over stdio, started and
    restarted by Corral) or ``url`` (a streamable HTTP endpoint someone else runs).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    command: list[str] | None = Field(None, min_length=1, description="stdio: the program and its arguments")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: extra environment variables")
    cwd: str | None = Field(None, description="stdio: the working directory")
    url: str | None = Field(None, description="streamable HTTP: the endpoint, e.g. http://127.0.0.1:8000/mcp")
    headers: dict[str, str] = Field(default_factory=dict, description="streamable HTTP: extra request headers")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="how long one tool call may take")

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not MCP_SERVER_NAME_PATTERN.match(value):
            raise ValueError("MCP server names are 1-32 letters, digits, '_' or '-', starting with a letter")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r} needs exactly one of `command` (stdio) or `url` (HTTP)")
        if self.command is not None:
            if not self.command[0]:
                raise ValueError(f"MCP server {self.name!r}: `command` must start with a program")
            if self.headers:
                raise ValueError(f"MCP server {self.name!r}: `headers` go with `url`, not `command`")
        elif self.env or self.cwd is not None:
            raise ValueError(f"MCP server {self.name!r}: `env` and `cwd` go with `command`, not `url`")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: `url` must be an http:// or https:// URL")
        return self


class AcpSpec(BaseModel):
    """An external agent that speaks ACP (Agent Client Protocol) over stdio.

    Corral starts the program in the agent's workspace, in a process group of its own, with
    a minimal environment plus ``env`` (never the server's own, which may hold secrets).
    """

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1, description="the program and its arguments")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    startup_timeout_s: float = Field(60.0, gt=0, le=3600, description="how long `initialize` + `session/new` may take")
    cancel_grace_s: float = Field(
        5.0, gt=0, le=600, description="after `session/cancel`, how long before the process is killed")

    @field_validator("command")
    @classmethod
    def _program_first(cls, command: list[str]) -> list[str]:
        if not command[0]:
            raise ValueError("`command` must start with a program")
        return command


class AgentSpec(BaseModel):
    """An agent: a model behind a provider, a system prompt, tools and a policy; or, with
    ``driver = "acp"``, an external program that runs its own model and tools."""

    model_config = ConfigDict(extra="forbid")

    name: str
    driver: Literal["model", "acp"] = "model"
    acp: AcpSpec | None = None
    provider: str = "demo"
    model: str | None = None
    provider_options: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[ProviderRef] = Field(default_factory=list, max_length=8)
    system_prompt: str | None = None
    tools: list[str] = Field(default_factory=lambda: ["wait", "echo"])
    policy: AgentPolicy = Field(default_factory=AgentPolicy)
    mcp_servers: list[McpServerSpec] = Field(default_factory=list, max_length=32)
    max_steps: int = Field(50, ge=1, le=10_000)
    context_budget_tokens: int | None = Field(
        None, ge=200, le=10_000_000, description="compact older turns into a summary beyond this (estimated)"
    )

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("agent names are 1-64 letters, digits, '_', '-' or '.', starting alphanumeric")
        return value

    @model_validator(mode="after")
    def _driver_needs(self) -> AgentSpec:
        if self.driver == "acp":
            if self.acp is None:
                raise ValueError('driver "acp" needs an `acp` section with a `command`')
            ignored = [name for name in ("mcp_servers", "fallbacks", "system_prompt", "context_budget_tokens")
                       if getattr(self, name)]
            if ignored:
                raise ValueError(f'an ACP agent runs its own model and tools; remove {", ".join(ignored)}')
        elif self.acp is not None:
            raise ValueError('an `acp` section needs driver "acp"')
        return self

    @field_validator("mcp_servers")
    @classmethod
    def _unique_servers(cls, servers: list[McpServerSpec]) -> list[McpServerSpec]:
        names = [server.name for server in servers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"MCP server names must be unique within an agent; repeated: {', '.join(repeated)}")
        return servers
