"""Agent specifications: what the API accepts and the kernel runs, validated once."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.types import Approval

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


class AgentSpec(BaseModel):
    """An agent: a model behind a provider, a system prompt, tools and a policy."""

    model_config = ConfigDict(extra="forbid")

    name: str
    provider: str = "demo"
    model: str | None = None
    provider_options: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[ProviderRef] = Field(default_factory=list, max_length=8)
    system_prompt: str | None = None
    tools: list[str] = Field(default_factory=lambda: ["wait", "echo"])
    policy: AgentPolicy = Field(default_factory=AgentPolicy)
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
