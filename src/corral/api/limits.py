"""Plain ASGI middleware (not BaseHTTPMiddleware, which breaks context propagation)."""

from __future__ import annotations

import hmac
import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.errors import OPENAI_TYPES, error_body
from corral.principals import LOCAL, Principal, TokenTable


async def _reply(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message, type=OPENAI_TYPES.get(status, "server_error"))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _reply(send, 413, "body_too_large", f"the body is over {self.max_bytes} bytes")
                return
        seen = 0
        too_large = False
        replied = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Whatever the app makes of the aborted read, the client gets a 413.
            nonlocal replied
            if not too_large:
                await send(message)
            elif not replied:
                replied = True
                await _reply(send, 413, "body_too_large", f"the body is over {self.max_bytes} bytes")

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not replied:
                await _reply(send, 413, "body_too_large", f"the body is over {self.max_bytes} bytes")


class _TooLarge(Exception):
    pass


class Authenticate:
    """Resolve the caller's principal from ``Authorization: Bearer <token>``.

    With no tokens configured everyone is the local admin (a loopback-only service,
    see ``check_exposure``). The web page's own files are public: they hold no data,
    and the page asks for a token before it calls the API.
    """

    OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
    OPEN_PREFIXES = ("/static/",)
    # An A2A agent card: clients read it before they call, to learn that a token is needed (docs/a2a.md).
    OPEN_PATTERN = re.compile(r"/a2a/[^/]+/\.well-known/agent-card\.json")

    def __init__(self, app: ASGIApp, tokens: TokenTable, cluster_secret: str | None = None):
        self.app = app
        self.tokens = tokens
        # Another node of the cluster, calling for one of its services: this node's admin.
        self._cluster_secret = cluster_secret.encode() if cluster_secret else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = LOCAL if not self.tokens.enabled else self._principal(scope)
        if principal is None and not self._is_open(scope["path"]):
            await _reply(send, 401, "unauthorized", "a valid API token is required (Authorization: Bearer ...)")
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _principal(self, scope: Scope) -> Principal | None:
        node = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return self.tokens.lookup(value[7:].strip().decode("latin-1"))
            if name == b"x-corral-cluster-secret" and self._cluster_secret is not None:
                node = LOCAL if hmac.compare_digest(value, self._cluster_secret) else None
        return node

    # What a chat platform pushes to a channel (/v1/channels/NAME/inbound, .../telegram, .../slack/events):
    # checked by the channel itself (a signature, a secret token).
    CHANNEL_PUSH = frozenset({"inbound", "telegram", "slack/events"})

    def _is_open(self, path: str) -> bool:
        if path.startswith("/v1/channels/"):
            name, _, rest = path[len("/v1/channels/"):].partition("/")
            if name and rest in self.CHANNEL_PUSH:
                return True
        return path in self.OPEN_PATHS or path.startswith(self.OPEN_PREFIXES) or bool(self.OPEN_PATTERN.fullmatch(path))
