"""How many subagents may work at once and how deep they may nest: plain data, so the settings
can build it without importing the subagent service (and through it the kernel and the store)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SubagentLimits:
    max_depth: int = 3
    max_children_per_session: int = 10
    max_total: int = 100
    cascade_cancel: bool = True
