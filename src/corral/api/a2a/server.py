"""The A2A endpoints' work: the SDK's JSON-RPC dispatcher over ``CorralRequestHandler``, and
the agent cards. Loaded on the first A2A request (``corral.api.a2a``), with the SDK."""

from __future__ import annotations

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.api.a2a.card import agent_card
from corral.api.a2a.handler import Caller, CorralRequestHandler
from corral.api.deps import kernel_of, principal_of
from corral.principals import Principal

PREFIX = "/a2a"


async def serve_rpc(request: Request) -> Response:
    """One JSON-RPC call (A2A 1.0 or 0.3 method names) for the agent the path names."""
    kernel_of(request).agents.get(request.path_params["agent"])  # an unknown agent: 404
    dispatcher = getattr(request.app.state, "a2a_dispatcher", None)
    if dispatcher is None:
        dispatcher = JsonRpcDispatcher(CorralRequestHandler(), context_builder=_CallContext(), enable_v0_3_compat=True)
        request.app.state.a2a_dispatcher = dispatcher
    return await dispatcher.handle_requests(request)


async def serve_card(request: Request) -> Response:
    """The agent's card; its URL is the one the client reached this server by."""
    name = request.path_params["agent"]
    agent = kernel_of(request).agents.get(name)  # an unknown agent: 404
    url = str(request.base_url).rstrip("/") + f"{PREFIX}/{name}"
    card = agent_card(agent, url, bearer=bool(getattr(request.app.state, "auth_required", False)))
    return JSONResponse(agent_card_to_dict(card), headers={"cache-control": "no-cache"})


class _CallContext(DefaultServerCallContextBuilder):
    """The SDK's call context (headers, the protocol version, extensions), plus who calls for
    which agent: the principal the ``Authenticate`` middleware found."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        principal = principal_of(request)
        context.user = _User(principal)
        context.state["corral"] = Caller(kernel_of(request), principal, request.path_params["agent"])
        return context


class _User(User):
    """A principal as the SDK's ``User`` (its logs and telemetry name the caller)."""

    def __init__(self, principal: Principal):
        self._principal = principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._principal.name
