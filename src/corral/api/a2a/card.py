"""An agent's A2A card: who it is, what it can do, where and how to call it."""

from __future__ import annotations

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol

from corral import __version__
from corral.kernel.agents import AgentRuntime

BEARER = "bearer"
INPUT_MODES = ["text/plain", "application/json"]
OUTPUT_MODES = ["text/plain"]


def agent_card(agent: AgentRuntime, url: str, *, bearer: bool) -> AgentCard:
    """The card of ``agent`` served at ``url``: one JSON-RPC endpoint speaking A2A 1.0 and 0.3;
    each tool is a skill; with ``bearer``, every call needs ``Authorization: Bearer <token>``."""
    spec = agent.spec
    card = AgentCard(
        name=spec.name,
        description=_description(agent),
        version=__version__,
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC.value,
                           protocol_version=PROTOCOL_VERSION_1_0),
            AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC.value,
                           protocol_version=PROTOCOL_VERSION_0_3),
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False, extended_agent_card=False),
        default_input_modes=INPUT_MODES,
        default_output_modes=OUTPUT_MODES,
        skills=_skills(agent),
    )
    if bearer:
        card.security_schemes[BEARER].CopyFrom(SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer", description="A Corral API token (docs/api.md, Principals and tokens)")))
        requirement = SecurityRequirement()
        requirement.schemes[BEARER].SetInParent()
        card.security_requirements.append(requirement)
    return card


def _description(agent: AgentRuntime) -> str:
    """The first line of the agent's system prompt, or what it runs on."""
    prompt = (agent.spec.system_prompt or "").strip()
    if prompt:
        return prompt.splitlines()[0].strip()
    spec = agent.spec
    if spec.driver == "acp":
        return f"A Corral agent ({spec.name}): an external agent over ACP"
    model = f", model {spec.model}" if spec.model else ""
    return f"A Corral agent ({spec.name}): provider {spec.provider}{model}"


def _skills(agent: AgentRuntime) -> list[AgentSkill]:
    """One skill per tool; an agent without tools converses."""
    if not agent.tools:
        return [AgentSkill(id="conversation", name="conversation", description="Answers messages", tags=["chat"])]
    policy = agent.spec.policy
    return [AgentSkill(id=name, name=name, description=tool.description or name,
                       tags=["tool", f"approval:{policy.approval_for(name).value}"])
            for name, tool in sorted(agent.tools.items())]
