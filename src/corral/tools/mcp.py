"""MCP tools: each agent's MCP servers, supervised, and their tools as Corral tools.

An agent's ``McpSupervisor`` runs one ``McpLink`` task per configured server (see
``mcp_link``), all inside one ``asyncio.TaskGroup`` that is the supervisor's own: the agent
manager starts ``run()`` when the agent starts and closes it (``aclose()``) when the agent
goes away. Servers come up in the background and independently: a slow or broken server
never delays the agent, its other servers or any other agent.

A server's tools are Corral tools named ``SERVER.TOOL`` (the approval policy names them so,
too). They stay in the agent's tool set while their server is down, so a call gets a clear
error at once ("MCP server X is down (restarting): ...") instead of an unknown-tool error.

The MCP SDK takes about a second to import. It is loaded in a worker thread the first
time some agent's servers start (``_link_module``): a service whose agents have no MCP
servers never loads it, and neither the start of one that does nor its event loop (every
other agent and session) waits for it. Until then the servers show as ``starting``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from corral.specs import McpServerSpec
from corral.tools.base import AnyArguments, JsonSchemaTool, Tool, ToolContext
from corral.tools.mcp_status import STOPPED, McpState, McpStatus, McpTimings, McpToolInfo

if TYPE_CHECKING:
    from corral.tools.mcp_link import McpLink

log = logging.getLogger(__name__)

__all__ = ["McpState", "McpStatus", "McpSupervisor", "McpTimings", "McpTool"]

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
# How long aclose() waits for the servers to shut down by themselves (a stdio server gets
# its stdin closed, then a SIGTERM after 2 s, a SIGKILL after 2 s more) before cancelling.
CLOSE_TIMEOUT_S = 8.0
LINK_MODULE = "corral.tools.mcp_link"


async def _link_module() -> ModuleType:
    """``mcp_link`` and the SDK behind it, imported off the event loop the first time."""
    loaded = sys.modules.get(LINK_MODULE)
    if loaded is not None:
        return loaded
    return await asyncio.to_thread(importlib.import_module, LINK_MODULE)


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
        self._specs = tuple(specs)
        self._timings = timings or McpTimings()
        # One link per server, made by run() once the SDK is loaded; until then (or if it was
        # stopped first, or the SDK failed to load) statuses() describes the servers itself.
        self._links: dict[str, McpLink] = {}
        self._stopped = False
        self._load_error: str | None = None
        self._tools: dict[str, Tool] = {}
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        states = ", ".join(f"{status.name}={status.state.value}" for status in self.statuses())
        return f"<McpSupervisor {self.agent}: {states}>"

    def start(self, spawn: Spawn) -> None:
        """Run the servers in a task ``spawn`` creates (the kernel's group); returns at once."""
        self._task = spawn(self.run(), f"agent-mcp:{self.agent}")

    async def run(self) -> None:
        """Own one task per server; returns once every server has stopped (``stop_nowait()``)."""
        try:
            module = await _link_module()
        except Exception as exc:  # a broken install: these servers stay down, the agent and the service go on
            log.exception("the MCP SDK failed to load; the MCP servers of agent %s stay down", self.agent)
            self._load_error = f"the MCP SDK failed to load: {type(exc).__name__}: {exc}"
            return
        if self._stopped:
            return
        self._links = {spec.name: module.McpLink(self.agent, spec, self._tools_changed, self._timings)
                       for spec in self._specs}
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
        return [self._links[spec.name].status() if spec.name in self._links else self._unlinked(spec.name)
                for spec in self._specs]

    def _unlinked(self, name: str) -> McpStatus:
        if self._stopped or self._load_error is not None:
            return McpStatus(name, McpState.DOWN, STOPPED if self._stopped else self._load_error, (), 0)
        return McpStatus(name, McpState.STARTING, None, (), 0)

    def stop_nowait(self) -> None:
        """Tell every server to stop; ``aclose()`` waits for them."""
        self._stopped = True
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

