"""A write for a session whose lane lives on another node goes to that node.

The kernel raises ``OwnedElsewhere`` when it would have to load a session another live
node holds; this handler sends the same request there (method, path, query, body and
the client's own headers, so the owner authenticates the caller itself) and answers with
the owner's answer, streamed through (an SSE answer included). One hop only: a request
that arrives forwarded, carrying the cluster secret, is never forwarded again (ownership
moved meanwhile: 503 with Retry-After). An owner that cannot be reached within its lease
is not taken over early either: 503 with Retry-After, and its sessions move only when its
lease has run out.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from corral.api.errors import error_body
from corral.errors import OwnedElsewhere
from corral.metrics import Metrics

log = logging.getLogger(__name__)

SECRET_HEADER = "x-corral-cluster-secret"
NODE_HEADER = "x-corral-node"
# What of the client's request travels with it (hop-by-hop headers and host do not).
PASSED = ("authorization", "content-type", "accept", "idempotency-key", "last-event-id", "x-corral-session",
          "user-agent")
RETRY_AFTER_S = "1"


# Asked every so often while a forwarded request waits: is its owner still alive?
OwnerAlive = Callable[[str], Awaitable[bool]]


class Forwarder:
    def __init__(self, secret: str, metrics: Metrics, *, owner_alive: OwnerAlive | None = None,
                 check_every_s: float = 1.0):
        self._secret = secret
        self._metrics = metrics
        self._owner_alive = owner_alive
        self._check_every_s = check_every_s
        # Connect fast; then wait as long as the owner lives (a paused owner still accepts
        # connections, its kernel's backlog does, but answers only once its lease is gone).
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    def came_forwarded(self, request: Request) -> bool:
        given = request.headers.get(SECRET_HEADER)
        return given is not None and hmac.compare_digest(given.encode(), self._secret.encode())

    async def handle(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OwnedElsewhere)
        if self.came_forwarded(request):
            self._metrics.forwarded_requests.labels("moved").inc()
            return _unavailable(f"session moved while this request was forwarded here ({exc})")
        headers = {name: value for name, value in request.headers.items() if name in PASSED}
        headers[SECRET_HEADER] = self._secret
        url = exc.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = self._client.build_request(request.method, url, headers=headers, content=await request.body())
        try:
            answer = await self._send_while_alive(outgoing, exc.node_id)
        except httpx.HTTPError as error:
            self._metrics.forwarded_requests.labels("unreachable").inc()
            log.warning("node %s (%s), the owner of a session, did not answer: %s", exc.node_id, exc.url, error)
            return _unavailable(f"node {exc.node_id}, where this session lives, did not answer; its sessions move "
                                "to a live node when its lease runs out")
        self._metrics.forwarded_requests.labels("sent").inc()
        kept = {name: value for name, value in answer.headers.items()
                if name not in ("content-length", "transfer-encoding", "connection", "date", "server")}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept,
                                 background=BackgroundTask(answer.aclose))


    async def _send_while_alive(self, outgoing: httpx.Request, node_id: str) -> httpx.Response:
        """The owner's answer; ``ReadTimeout`` once the owner is found dead before it answered."""
        sending = asyncio.ensure_future(self._client.send(outgoing, stream=True))
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=self._check_every_s)
                if done:
                    return sending.result()
                if self._owner_alive is not None and not await self._owner_alive(node_id):
                    raise httpx.ReadTimeout(f"node {node_id} lost its lease before it answered")
        finally:
            if not sending.done():
                sending.cancel()


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body("owner_unavailable", message, type="server_error"), status_code=503,
                        headers={"retry-after": RETRY_AFTER_S})


def install(app: FastAPI, forwarder: Forwarder) -> None:
    app.add_exception_handler(OwnedElsewhere, forwarder.handle)
