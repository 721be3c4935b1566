"""A live run's stream, from its start, served without the router (docs/benchmarks.md).

A client that follows each turn (docs/api.md) sends two requests a turn: ``POST .../messages``,
then ``GET /v1/runs/{id}/events``. The second has nothing to validate but its path, and the
layers between the authentication middleware and a route (exception handlers, FastAPI's exit
stack, the router, the route's request wrapper, FastAPI's parameter solving) were most of what
it cost beside the first. This middleware sits inside ``Authenticate`` and ``LogContext``, so
the request is authenticated and logged as any other, and serves it directly when, and only
when, nothing can go wrong that a route would have to explain:

- the request is that plain form: ``GET``, no query, no ``Last-Event-ID``;
- the run is unfinished and its session is held by this node, in memory;
- the caller may see the session (an admin, or its owner);
- the connection can take the stream's frames directly (``connection_transport``).

Anything else (an ended run to replay, a session held elsewhere, someone else's run, a resume,
another server) passes on unchanged to ``routes.events.run_events``, which checks and answers
it as usual: a caller who may not see the run gets the route's 404 whichever way it came.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.api.deps import held_run, principal_in
from corral.api.stream import EventStream, connection_transport

_RUN_EVENTS = re.compile(r"/v1/runs/([^/]+)/events")


def plain_run_stream(scope: Scope) -> str | None:
    """The run id when ``scope`` asks for a run's stream from its start and nothing more."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope["query_string"]:
        return None
    match = _RUN_EVENTS.fullmatch(scope["path"])
    if match is None or any(name == b"last-event-id" for name, _ in scope["headers"]):
        return None
    return match[1]


class RunStreamShortcut:
    """ASGI middleware: a live run's plain stream request, answered without the layers under it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self._stream_for(scope)
        if stream is None:
            await self.app(scope, receive, send)
        else:
            await stream(scope, receive, send)

    @staticmethod
    def _stream_for(scope: Scope) -> EventStream | None:
        run_id = plain_run_stream(scope)
        if run_id is None:
            return None
        kernel = getattr(scope["app"].state, "kernel", None)
        if kernel is None or kernel.stopping.is_set():
            return None
        held = held_run(kernel, run_id)
        if held is None or not principal_in(scope).may_access(held[1]):
            return None
        transport = connection_transport(scope)
        if transport is None:
            return None
        return EventStream(kernel, transport, held[0], run_id=run_id)
