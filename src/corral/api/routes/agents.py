"""Agents: created at once in `starting`; the driver handshake runs in the background."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.deps import KernelDep, PrincipalDep, require_admin
from corral.api.json_body import CheckedRoute
from corral.api.schemas import AgentOut, McpServerOut
from corral.kernel.agents import AgentRuntime
from corral.specs import AgentSpec

router = APIRouter(prefix="/v1/agents", tags=["agents"], route_class=CheckedRoute)


def agent_out(agent: AgentRuntime) -> AgentOut:
    spec = agent.spec
    return AgentOut(
        name=spec.name, driver=spec.driver, provider=spec.provider, model=spec.model, state=agent.state,
        error=agent.error,
        generation=agent.generation, tools=spec.tools, system_prompt=spec.system_prompt,
        created_at=agent.created_at,
        mcp_servers=[McpServerOut(name=s.name, state=s.state, error=s.error, tools=list(s.tools))
                     for s in (agent.mcp.statuses() if agent.mcp is not None else [])],
    )


@router.post("", status_code=201)
async def create_agent(spec: AgentSpec, kernel: KernelDep) -> AgentOut:
    return agent_out(await kernel.agents.create(spec))


@router.get("")
async def list_agents(kernel: KernelDep) -> list[AgentOut]:
    return [agent_out(agent) for agent in kernel.agents.list()]


@router.get("/{name}")
async def get_agent(name: str, kernel: KernelDep) -> AgentOut:
    return agent_out(kernel.agents.get(name))


@router.delete("/{name}", status_code=204)
async def delete_agent(name: str, kernel: KernelDep, principal: PrincipalDep) -> Response:
    """Agents are shared by every principal, so only an admin may take one away."""
    require_admin(principal)
    await kernel.agents.delete(name)
    return Response(status_code=204)


@router.post("/{name}/restart")
async def restart_agent(name: str, kernel: KernelDep, principal: PrincipalDep) -> AgentOut:
    """A fresh start of the same agent (a new generation), for one that failed or hangs; its runs
    in flight fail. Like deleting, it disturbs everyone's runs, so only an admin may."""
    require_admin(principal)
    return agent_out(await kernel.agents.restart(name))
