"""The A2A face (docs/a2a.md): each agent at ``/a2a/{agent}``, its card at
``/a2a/{agent}/.well-known/agent-card.json``; contexts are sessions, tasks are runs.

This module is light on purpose: the a2a-sdk (protobuf and all, most of a second of imports)
loads on the first A2A request, not at every start of the server.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

CARD_PATH = "/.well-known/agent-card.json"

__all__ = ["CARD_PATH", "routes"]


def routes() -> list[BaseRoute]:
    """The JSON-RPC endpoint (POST) and the card (GET) of every agent, present and future."""
    return [Route("/a2a/{agent}", _rpc, methods=["POST"], include_in_schema=False),
            Route("/a2a/{agent}" + CARD_PATH, _card, methods=["GET"], include_in_schema=False)]


async def _rpc(request: Request) -> Response:
    from corral.api.a2a.server import serve_rpc  # the SDK loads here, once

    return await serve_rpc(request)


async def _card(request: Request) -> Response:
    from corral.api.a2a.server import serve_card  # the SDK loads here, once

    return await serve_card(request)
