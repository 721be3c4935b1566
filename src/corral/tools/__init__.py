"""Tools agents can call: built-ins, and the registry agents pick theirs from."""

from corral.tools.base import Tool, ToolContext, ToolRegistry
from corral.tools.builtin import BUILTIN_TOOLS
from corral.tools.config import ToolSettings
from corral.tools.files import file_tools
from corral.tools.http import http_fetch_tool
from corral.tools.shell import shell_tool

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolContext", "ToolRegistry", "ToolSettings", "default_registry"]


def default_registry(settings: ToolSettings | None = None) -> ToolRegistry:
    """wait and echo, plus shell, the file tools and http_fetch, limited by ``settings``."""
    settings = settings or ToolSettings()
    return ToolRegistry([*BUILTIN_TOOLS, shell_tool(settings), *file_tools(settings), http_fetch_tool(settings)])
