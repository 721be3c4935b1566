"""Requests log with the session or run they are about (the ASGI side of ``corral.logs``)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.logs import run_id_var, session_id_var

_ID_PATH = re.compile(r"^/v1/(sessions|runs)/([^/]+)")


class LogContext:
    """ASGI middleware: a request on ``/v1/sessions/{id}…`` or ``/v1/runs/{id}…`` logs with that id.

    Plain ASGI (not ``BaseHTTPMiddleware``) so the binding is seen by the route, the tasks it
    starts and uvicorn's access line, which all run in this request's context.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _ID_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        var = session_id_var if match[1] == "sessions" else run_id_var
        token = var.set(match[2])
        try:
            await self.app(scope, receive, send)
        finally:
            var.reset(token)
