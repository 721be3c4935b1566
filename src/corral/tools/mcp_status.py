"""What the rest of Corral sees of an agent's MCP servers: plain data, without the MCP SDK.

The API shows these (``GET /v1/agents/{name}``) and tests compare them; the SDK itself
(``mcp_link``) is loaded only when some agent's servers start.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

STOPPED = "stopped (its agent was deleted or replaced, or the service is stopping)"


class McpState(StrEnum):
    """A server's state; ``starting`` covers a restart too (``error`` then keeps the last failure)."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class McpStatus:
    """What ``GET /v1/agents/{name}`` shows of one server: ``error`` is the last failure."""

    name: str
    state: McpState
    error: str | None
    tools: tuple[str, ...]
    restarts: int


@dataclass(frozen=True)
class McpTimings:
    """How patient the supervisor is; a parameter so tests and operators can change it."""

    start_s: float = 30.0  # spawn/connect, handshake and the first tools/list
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_s: float = 10.0  # up at least this long: the next failure restarts after backoff_min_s again
    refresh_s: float = 30.0  # re-list tools: catches a changed list, and an HTTP server that went away


@dataclass(frozen=True)
class McpToolInfo:
    """One tool as the server listed it (``name`` is the server's own, without the prefix)."""

    name: str
    description: str
    schema: dict[str, Any]
