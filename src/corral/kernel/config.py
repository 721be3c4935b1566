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
    # Sessions whose runtime (lane, pending contents) stays in memory while idle; an evicted
    # idle session is loaded again from the store on its next message.
    live_sessions: int = 10_000
    # Idempotency keys remembered per session; older ones are looked up in the store.
    idempotency_keys_per_session: int = 1_000
    # Repairing a transition whose write failed: the same write is retried with backoff
    # (doubling from ``write_retry_min_s`` up to ``write_retry_max_s``) for as long as the store
    # is unavailable; a write the store rejects outright is tried ``write_attempts`` times, then
    # recorded in its simpler form (a run's end without its output, as failed).
    write_retry_min_s: float = 0.05
    write_retry_max_s: float = 2.0
    write_attempts: int = 3
    # A run waiting for the results of its client's tool calls is cancelled after this long
    # without them (``kernel/client_tools.py``); 0: it waits for ever.
    client_tools_timeout_s: float = 600.0
