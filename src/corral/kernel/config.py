"""The kernel's settings, as plain data: importing them costs nothing (settings build one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelConfig:
    max_pending_inputs: int = 1000
    interrupt_grace_s: float = 2.0
    shutdown_grace_s: float = 5.0
    requeue_interrupted: bool = True
    max_tool_processes: int = 8
    # Sessions whose conversation stays in memory between runs (least recently used out).
    conversation_cache_sessions: int = 1000
    # Each agent's tools work in ``workspace_root / <agent name>``.
    workspace_root: Path = Path(".corral/workspaces")
