"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.tools.mcp_status import McpState
from corral.types import AgentState, CancelMode, Decision, Disposition, ExecPolicy, Mode, RunStatus

# Positions and offsets are stored as 64-bit integers: anything larger is a client error, not a 500.
MAX_INT64 = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A session's metadata is read back with every listing, so it is kept small and shallow.
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


class SessionIn(Strict):
    agent: str = "assistant"
    key: str | None = Field(None, min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"your own labels, returned as given: up to {MAX_METADATA_BYTES} bytes as JSON, "
        f"nested up to {MAX_METADATA_DEPTH} levels",
    )

    @field_validator("metadata")
    @classmethod
    def _small_and_shallow(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON, over the {MAX_METADATA_BYTES} allowed")
        return value


class MessageIn(Strict):
    content: str = Field(min_length=1, max_length=200_000)
    mode: Mode = Mode.QUEUE
    policy: ExecPolicy = ExecPolicy.CONTINUE
    debounce_ms: int = Field(0, ge=0, le=60_000, description="with mode=collect: wait for a burst to settle")


class CancelIn(Strict):
    mode: CancelMode = CancelMode.SOFT


class DecisionIn(Strict):
    decision: Decision


class McpServerOut(BaseModel):
    name: str
    state: McpState
    error: str | None = Field(description="the last failure (while down or restarting)")
    tools: list[str] = Field(description="the server's tools, as the model calls them: SERVER.TOOL")


class AgentOut(BaseModel):
    name: str
    driver: str = Field(description='"model" (a provider) or "acp" (an external agent program)')
    provider: str
    model: str | None
    state: AgentState
    error: str | None
    generation: int
    tools: list[str]
    system_prompt: str | None
    created_at: datetime
    mcp_servers: list[McpServerOut] = Field(default_factory=list, description="each MCP server's live state")


class ChildOut(BaseModel):
    session_id: str
    task: str
    status: str | None = Field(description="how its work ended; null while it is still at work")
    result: str | None
    created_at: datetime


class SessionOut(BaseModel):
    id: str
    agent: str
    owner: str
    key: str | None
    metadata: dict[str, Any]
    created_at: datetime
    title: str | None = Field(None, description="written by the reflector after the first turn")
    summary: str | None = Field(None, description="a rolling summary, refreshed every few turns")
    active_run_id: str | None
    active_status: RunStatus | None
    queued: int
    last_event_seq: int = Field(0, description="the newest event's seq: follow from here for only what is new")
    parent_session_id: str | None = Field(None, description="for a subagent's session (GET /v1/sessions/{id} only)")
    children: list[ChildOut] = Field(default_factory=list, description="subagents it spawned (GET one session only)")


class AcceptedOut(BaseModel):
    input_id: str
    run_id: str
    session_id: str
    disposition: Disposition


class PendingApproval(BaseModel):
    call_id: str
    tool: str
    arguments: dict[str, Any]


class RunOut(BaseModel):
    id: str
    session_id: str
    status: RunStatus
    policy: ExecPolicy
    output: str | None
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    pending_approvals: list[PendingApproval] = Field(
        default_factory=list, description="the calls a waiting run needs decisions on (GET /v1/runs/{id} only)"
    )
    pending_client_calls: list[PendingApproval] = Field(
        default_factory=list,
        description="calls of an OpenAI client's own tools whose results a waiting run needs (GET /v1/runs/{id} only)",
    )


class RunList(BaseModel):
    runs: list[RunOut]
    limit: int
    offset: int


class CancelOut(BaseModel):
    run_id: str
    mode: CancelMode
    status: RunStatus


class MessageOut(BaseModel):
    id: int
    run_id: str
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    rolled_back: bool
    created_at: datetime
