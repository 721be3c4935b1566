"""The real parts the kernel runs with, assembled in one place.

The kernel knows runners, providers, external agents and MCP servers only through
``corral.kernel.ports.Backends``; this module is where those ports meet the packages
that implement them (loop, drivers, providers, tools). Each is imported when first
used, so a process that never starts an ACP agent or an MCP server never loads their
SDKs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.kernel.ports import Backends, ExternalAgent, McpServers, RunContext, Runner
from corral.providers.base import Provider
from corral.specs import AgentSpec


def default_backends() -> Backends:
    return Backends(runner=make_runner, validate=_validate, provider=_provider, external_agent=_external_agent,
                    mcp=_mcp)


def make_runner(context: RunContext) -> Runner:
    """What drives a run: an external ACP agent's turn, or the step loop over a model."""
    if context.agent.spec.driver == "acp":
        from corral.drivers.acp_turn import AcpTurn

        return AcpTurn(context)
    from corral.loop.runner import StepLoop

    return StepLoop(context)


def _validate(spec: AgentSpec) -> None:
    from corral.providers.registry import validate_agent

    validate_agent(spec)


def _provider(spec: AgentSpec) -> Provider:
    from corral.providers.registry import create_provider

    return create_provider(spec)


def _external_agent(spec: AgentSpec, workspace: Path, on_exit: Callable[[Any], None]) -> ExternalAgent:
    from corral.drivers.acp_process import AcpProcess

    assert spec.acp is not None
    return AcpProcess(spec.name, spec.acp, workspace, on_exit)


def _mcp(agent: str, servers: Any, on_change: Callable[[], None]) -> McpServers:
    from corral.tools.mcp import McpSupervisor

    return McpSupervisor(agent, servers, on_change)
