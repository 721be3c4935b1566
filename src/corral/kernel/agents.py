"""The agent manager: agents start in the background and never block their creator.

Every entry carries a generation. A start task remembers the generation it started
and may only update an entry of that same generation, so a slow, stale start can
never overwrite a newer agent of the same name (invariant 10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.clock import utcnow
from corral.errors import AgentUnavailable, Conflict, NotFound, StoreConflict
from corral.kernel.ports import Backends, ExternalAgent, KernelStore, McpServers, Spawn
from corral.kernel.slots import PrioritySlot
from corral.specs import AgentSpec
from corral.types import AgentState

if TYPE_CHECKING:
    from corral.providers.base import Provider
    from corral.tools.base import Tool, ToolRegistry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentRuntime:
    spec: AgentSpec
    generation: int
    tools: dict[str, Tool]
    state: AgentState = AgentState.STARTING
    error: str | None = None
    provider: Provider | None = None
    # Held only around a model call: the provider's max_concurrent_calls.
    slot: PrioritySlot = field(default_factory=lambda: PrioritySlot(1000))
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    start_task: asyncio.Task[None] | None = None
    created_at: Any = field(default_factory=utcnow)
    # The agent's MCP servers, started with the agent; their tools are merged into `tools`.
    mcp: McpServers | None = None
    # The names in `tools` that came from the MCP servers (replaced when they list anew).
    mcp_tool_names: frozenset[str] = frozenset()
    # An external agent's program (driver "acp"), in place of a provider.
    acp: ExternalAgent | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<Agent {self.name} gen={self.generation} {self.state.value}>"


class AgentManager:
    def __init__(self, store: KernelStore, tools: ToolRegistry, spawn: Spawn, workspace_root: Path,
                 backends: Backends):
        self._store = store
        self._tools = tools
        self._spawn = spawn
        self._workspace_root = workspace_root
        self._backends = backends
        # Told after an agent was created or deleted here (a cluster tells the other nodes).
        self.on_change: Callable[[], None] | None = None
        self._agents: dict[str, AgentRuntime] = {}
        self._generations = count(1)

    def __repr__(self) -> str:
        states = [a.state.value for a in self._agents.values()]
        return f"<AgentManager agents={len(states)} ready={states.count('ready')}>"

    def list(self) -> list[AgentRuntime]:
        return sorted(self._agents.values(), key=lambda a: a.name)

    def get(self, name: str) -> AgentRuntime:
        agent = self._agents.get(name)
        if agent is None:
            raise NotFound(f"no agent named {name!r}")
        return agent

    def exists(self, name: str) -> bool:
        return name in self._agents

    def ready_now(self, name: str) -> bool:
        """Whether ``wait_ready(name)`` would return at once, without waiting."""
        agent = self._agents.get(name)
        return agent is not None and agent.settled.is_set() and agent.state is AgentState.READY

    async def load(self) -> None:
        """Start every agent recorded in the store (at service start)."""
        rows = await self._store.all_agents()
        for row in rows:
            spec = AgentSpec.model_validate(row.config)
            if spec.name not in self._agents:
                self._reserve(spec, created_at=row.created_at)

    async def sync(self) -> None:
        """Match the store: start agents another node created, drop those it deleted (a cluster's
        nodes share the agents table; each runs its own copy of every agent)."""
        rows = await self._store.all_agents()
        stored = {row.name for row in rows}
        for row in rows:
            if row.name not in self._agents:
                self._reserve(AgentSpec.model_validate(row.config), created_at=row.created_at)
        for name in [name for name in self._agents if name not in stored]:
            agent = self._agents[name]
            if agent.settled.is_set() or agent.start_task is not None:  # not one being created here right now
                self._drop(agent)
                self._spawn(self._close(agent), f"agent-close:{name}:{agent.generation}")

    async def create(self, spec: AgentSpec) -> AgentRuntime:
        """Register and persist the agent, then start it in the background; returns at once."""
        self._backends.validate(spec)
        tools = self._tools.select(spec.tools)
        if spec.name in self._agents:
            raise Conflict(f"an agent named {spec.name!r} already exists")
        agent = self._reserve(spec, tools=tools, start=False)
        try:
            row = {"name": spec.name, "config": spec.model_dump(mode="json"), "created_at": agent.created_at}
            await self._store.create_agent(row)
        except StoreConflict as exc:
            self._drop(agent)
            raise Conflict(f"an agent named {spec.name!r} already exists") from exc
        except BaseException:
            self._drop(agent)
            raise
        if self._agents.get(spec.name) is agent:
            self._launch(agent)
        self._changed()
        return agent

    async def delete(self, name: str) -> None:
        """The row goes first: a store that refuses the write (a full disk) leaves the agent as
        it was, in memory as in the store, and the caller gets the store's error to retry."""
        self.get(name)
        await self._store.delete_agent(name)
        agent = self._agents.get(name)  # the current generation: a restart may have replaced it meanwhile
        if agent is None:
            return  # a delete of the same name, waiting on the same write, dropped it
        self._drop(agent)
        self._changed()
        await self._close(agent)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def restart(self, name: str) -> AgentRuntime:
        """Replace the agent by a fresh start of the same spec (a new generation); returns at once
        with the new one ``starting``, after the old one's processes are gone. Its runs in flight
        fail; queued runs wait for the new one."""
        old = self.get(name)
        new = self._replace(old, "restarted")
        await self._close(old)
        return new

    def _replace(self, old: AgentRuntime, reason: str) -> AgentRuntime:
        self._drop(old, reason=reason)
        return self._reserve(old.spec, created_at=old.created_at)

    async def wait_ready(self, name: str) -> AgentRuntime:
        """The agent once it is ready; ``AgentUnavailable`` if it failed or is gone."""
        synced = False
        while True:
            agent = self._agents.get(name)
            if agent is None and not synced:
                await self.sync()  # created by another node of a cluster a moment ago?
                synced = True
                continue
            if agent is None:
                raise AgentUnavailable(f"agent {name!r} does not exist (deleted?)")
            await agent.settled.wait()
            if self._agents.get(name) is not agent:
                continue  # replaced while we waited: wait for the new one
            if agent.state is AgentState.FAILED:
                raise AgentUnavailable(f"agent {name!r} failed to start: {agent.error}")
            return agent

    async def aclose(self) -> None:
        agents = list(self._agents.values())
        for agent in agents:
            self._drop(agent)  # tells its MCP servers to stop, so all of them stop at once
        for agent in agents:
            await self._close(agent)

    async def _close(self, agent: AgentRuntime) -> None:
        """After ``_drop``: wait for a cancelled start to clean up after itself (so nothing it
        spawned outlives this call), then release the provider or program and MCP servers."""
        if agent.start_task is not None and not agent.start_task.done():
            await asyncio.wait([agent.start_task])
        await self._close_provider(agent)
        await self._close_mcp(agent)

    async def _close_provider(self, agent: AgentRuntime) -> None:
        """Release the provider's connections (runs still using it fail at their next call), or
        stop the external agent's program."""
        provider, agent.provider = agent.provider, None
        if provider is not None:
            await provider.aclose()
        process, agent.acp = agent.acp, None
        if process is not None:
            await process.aclose()

    async def _close_mcp(self, agent: AgentRuntime) -> None:
        """Stop the agent's MCP servers and wait until they are gone, stdio processes included."""
        if agent.mcp is not None:
            await agent.mcp.aclose()

    def _mcp_tools_changed(self, agent: AgentRuntime) -> None:
        """An MCP server listed its tools: publish the agent's tool set anew (a fresh dict, so a
        step that is iterating the old one is not disturbed)."""
        if self._agents.get(agent.name) is not agent or agent.mcp is None:
            return  # a stale generation's servers never touch the current agent
        listed = agent.mcp.tools()
        kept = {name: tool for name, tool in agent.tools.items() if name not in agent.mcp_tool_names}
        agent.tools = kept | listed
        agent.mcp_tool_names = frozenset(listed)

    def _reserve(
        self, spec: AgentSpec, *, tools: dict[str, Tool] | None = None, start: bool = True, created_at: Any = None
    ) -> AgentRuntime:
        agent = AgentRuntime(spec, next(self._generations), tools if tools is not None else {})
        if created_at is not None:
            agent.created_at = created_at
        self._agents[spec.name] = agent
        if start:
            try:
                agent.tools = self._tools.select(spec.tools)
            except Exception as exc:  # a stored agent naming a tool that no longer exists
                self._fail(agent, exc)
                return agent
            self._launch(agent)
        return agent

    def _launch(self, agent: AgentRuntime) -> None:
        agent.start_task = self._spawn(self._start(agent), f"agent-start:{agent.name}:{agent.generation}")
        if agent.spec.mcp_servers:  # in the background too: the agent is ready when its provider is
            agent.mcp = self._backends.mcp(agent.name, agent.spec.mcp_servers, lambda: self._mcp_tools_changed(agent))
            agent.mcp.start(self._spawn)

    async def _start(self, agent: AgentRuntime) -> None:
        provider: Provider | None = None
        process: ExternalAgent | None = None
        try:
            spec = agent.spec
            if spec.acp is not None:  # an external agent's program, in place of a model provider
                process = self._backends.external_agent(spec, self._workspace_root / spec.name,
                                                        lambda exited: self._acp_exited(agent, exited))
                await process.start()
            else:
                provider = self._backends.provider(spec)
                await provider.start()
        except asyncio.CancelledError:
            await asyncio.shield(_close(provider, process))
            raise
        except Exception as exc:
            log.warning("agent %s failed to start: %s", agent.name, exc)
            await _close(provider, process)
            self._fail(agent, exc)
            await self._close_mcp(agent)  # a failed agent runs nothing: its servers would only idle
            return
        if self._agents.get(agent.name) is not agent:
            await _close(provider, process)  # stale generation: a newer agent owns the name
            return
        agent.acp, agent.provider = process, provider
        if provider is not None:
            agent.slot = PrioritySlot(provider.max_concurrent_calls)
        agent.state = AgentState.READY
        agent.settled.set()

    def _acp_exited(self, agent: AgentRuntime, process: ExternalAgent) -> None:
        """The program of a ready ACP agent is gone. Killed (a hard cancel): start it again, at
        once, so the next run waits for the new one. Exited on its own: the agent fails with the
        reason, rather than restart in a loop."""
        if self._agents.get(agent.name) is not agent or agent.acp is not process:
            return  # a stale generation's program, or one being closed
        if process.killed:
            self._replace(agent, "restarted after its program was killed")
            self._spawn(self._close(agent), f"agent-close:{agent.name}:{agent.generation}")
            return
        agent.acp = None
        agent.state = AgentState.FAILED
        agent.error = (f"the ACP agent exited with code {process.exit_code}; "
                       f"restart it with POST /v1/agents/{agent.name}/restart")
        self._spawn(process.aclose(), f"agent-reap:{agent.name}:{agent.generation}")


    def _fail(self, agent: AgentRuntime, exc: BaseException) -> None:
        if self._agents.get(agent.name) is agent:
            agent.state = AgentState.FAILED
            agent.error = str(exc) or type(exc).__name__
            agent.settled.set()

    def _drop(self, agent: AgentRuntime, *, reason: str = "deleted") -> None:
        if self._agents.get(agent.name) is agent:
            del self._agents[agent.name]
        if agent.start_task is not None and not agent.start_task.done():
            agent.start_task.cancel()
        if agent.mcp is not None:
            agent.mcp.stop_nowait()
        agent.state = AgentState.FAILED
        agent.error = agent.error or reason
        agent.settled.set()


async def _close(provider: Provider | None, process: ExternalAgent | None) -> None:
    if provider is not None:
        await provider.aclose()
    if process is not None:
        await process.aclose()
