"""MCP tools: each agent's MCP servers, supervised, and their tools as Corral tools.

An agent's ``McpSupervisor`` runs one ``McpLink`` task per configured server (see
``mcp_link``), all inside one ``asyncio.TaskGroup`` that is the supervisor's own: the agent
manager starts ``run()`` when the agent starts and closes it (``aclose()``) when the agent
goes away. Servers come up in the background and independently: a slow or broken server
never delays the agent, its other servers or any other agent.

A server's tools are Corral tools named ``SERVER.TOOL`` (the approval policy names them so,
too). They stay in the agent's tool set while their server is down, so a call gets a clear
error at once ("MCP server X is down (restarting): ...") instead of an unknown-tool error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from corral.specs import McpServerSpec
from corral.tools.base import AnyArguments, JsonSchemaTool, Tool, ToolContext

# Imported eagerly although the SDK takes ~1 s to import: at first use it would block the
# event loop, and with it every other agent and session.
from corral.tools.mcp_link import McpLink, McpState, McpStatus, McpTimings, McpToolInfo

log = logging.getLogger(__name__)

__all__ = ["McpState", "McpStatus", "McpSupervisor", "McpTimings", "McpTool"]

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
# How long aclose() waits for the servers to shut down by themselves (a stdio server gets
# its stdin closed, then a SIGTERM after 2 s, a SIGKILL after 2 s more) before cancelling.
CLOSE_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class McpTool(JsonSchemaTool):
    """A tool of an MCP server; ``server`` is the server's name within its agent."""

    server: str = ""


class McpSupervisor:
    """The MCP servers of one agent.

    ``on_change`` is called (synchronously) whenever a server's tool listing changes: at its
    first start, after a restart that found a different list, after a periodic re-list.
    """

    def __init__(
        self, agent: str, specs: Sequence[McpServerSpec], on_change: Callable[[], None],
        timings: McpTimings | None = None,
    ):
        self.agent = agent
        self._on_change = on_change
        timings = timings or McpTimings()
        self._links = {spec.name: McpLink(agent, spec, self._tools_changed, timings) for spec in specs}
        self._tools: dict[str, Tool] = {}
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        states = ", ".join(f"{link.name}={link.state.value}" for link in self._links.values())
        return f"<McpSupervisor {self.agent}: {states}>"

    def start(self, spawn: Spawn) -> None:
        """Run the servers in a task ``spawn`` creates (the kernel's group); returns at once."""
        self._task = spawn(self.run(), f"agent-mcp:{self.agent}")

    async def run(self) -> None:
        """Own one task per server; returns once every server has stopped (``stop_nowait()``)."""
        async with asyncio.TaskGroup() as group:
            for link in self._links.values():
                group.create_task(self._run_link(link), name=f"mcp:{self.agent}:{link.name}")

    async def _run_link(self, link: McpLink) -> None:
        # A link handles its servers' failures itself; this catches a bug in the link, which
        # must not cancel the other links (nor, through the kernel's group, the service).
        try:
            await link.run()
        except Exception as exc:
            log.exception("the MCP link %r failed; its server stays down", link)
            link.stop_nowait(f"stopped after an internal error: {type(exc).__name__}: {exc}")

    def tools(self) -> dict[str, Tool]:
        """Every tool the servers have listed, by full name; a copy the caller may keep."""
        return dict(self._tools)

    def statuses(self) -> list[McpStatus]:
        return [link.status() for link in self._links.values()]

    def stop_nowait(self) -> None:
        """Tell every server to stop; ``aclose()`` waits for them."""
        for link in self._links.values():
            link.stop_nowait()

    async def aclose(self) -> None:
        """Stop every server and wait until each is gone, its stdio process included.

        A server that exits when its stdin closes is gone in milliseconds; one that ignores
        that is terminated (SIGTERM, then SIGKILL, to its process group) within seconds.
        """
        self.stop_nowait()
        task = self._task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.warning("the MCP servers of agent %s did not stop within %.0f s; cancelling", self.agent,
                        CLOSE_TIMEOUT_S)
            task.cancel()
            await asyncio.wait({task})

    def _tools_changed(self) -> None:
        tools: dict[str, Tool] = {}
        for link in self._links.values():
            for info in link.tools:
                tool = _mcp_tool(link, info)
                tools[tool.name] = tool
        self._tools = tools
        self._on_change()


def _mcp_tool(link: McpLink, info: McpToolInfo) -> McpTool:
    async def call(arguments: dict[str, Any], context: ToolContext) -> str:
        return await link.call(info.name, arguments)

    # MCP calls take no tool-process slot: the server's process is long-lived, not per call.
    return McpTool(f"{link.name}.{info.name}", info.description, AnyArguments, call, parameters=info.schema,
                   server=link.name)

