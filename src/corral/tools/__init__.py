"""Tools agents can call: built-ins, and the registry agents pick theirs from.

The names below load on first use, so importing a light module of the package
(``corral.tools.config``, which the settings need) does not import every tool and the
libraries behind them (httpx for ``http_fetch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.lazy import lazy_attributes

if TYPE_CHECKING:
    from corral.tools.base import Tool, ToolContext, ToolRegistry
    from corral.tools.builtin import BUILTIN_TOOLS
    from corral.tools.config import ToolSettings

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolContext", "ToolRegistry", "ToolSettings", "default_registry"]

_HOMES = {
    "BUILTIN_TOOLS": "corral.tools.builtin",
    "Tool": "corral.tools.base",
    "ToolContext": "corral.tools.base",
    "ToolRegistry": "corral.tools.base",
    "ToolSettings": "corral.tools.config",
}


__getattr__ = lazy_attributes(__name__, _HOMES)


def default_registry(settings: ToolSettings | None = None) -> ToolRegistry:
    """wait and echo, plus shell, the file tools and http_fetch, limited by ``settings``."""
    from corral.tools.base import ToolRegistry
    from corral.tools.builtin import BUILTIN_TOOLS
    from corral.tools.config import ToolSettings
    from corral.tools.files import file_tools
    from corral.tools.http import http_fetch_tool
    from corral.tools.shell import shell_tool

    settings = settings or ToolSettings()
    return ToolRegistry([*BUILTIN_TOOLS, shell_tool(settings), *file_tools(settings), http_fetch_tool(settings)])
