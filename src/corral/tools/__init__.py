"""Tools agents can call: built-ins here; approval policy in ``policy``."""

from corral.tools.base import Tool, ToolContext, ToolRegistry
from corral.tools.builtin import BUILTIN_TOOLS

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolContext", "ToolRegistry", "default_registry"]


def default_registry() -> ToolRegistry:
    return ToolRegistry(BUILTIN_TOOLS)
