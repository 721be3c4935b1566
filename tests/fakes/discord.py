"""A fake Discord: the REST API (``/api/v10/...``) and the gateway (a websocket at ``/gateway``).

The gateway says Hello (with a short heartbeat interval), checks the Identify's token (a wrong
one is closed with 4004, as Discord does), answers READY, acknowledges heartbeats, and sends
the dispatches tests push (``push_message``, ``push_press``); ``reconnect()`` sends op 7. The
REST side keeps each channel's messages with their edits, records typing and interaction
callbacks, counts rate-limit violations (5 messages or edits per 5 s per channel) and answers
failures on cue (``fail``, 429 with ``retry_after`` in the body).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

TOKEN = "discord-test-token-never-logged"
BOT_ID = "999"


@dataclass
class Message:
    id: str
    channel_id: str
    content: str
    components: list[dict[str, Any]]
    edits: list[str] = field(default_factory=list)

    @property
    def buttons(self) -> list[tuple[str, str]]:
        return [(c["label"], c["custom_id"]) for row in self.components for c in row["components"]]


class FakeDiscord:
    def __init__(self, *, heartbeat_ms: int = 500):
        self.heartbeat_ms = heartbeat_ms
        self.messages: dict[str, list[Message]] = {}
        self.calls: list[tuple[str, str, float]] = []
        self.violations: list[str] = []
        self.failures: list[list[Any]] = []  # [method, path fragment, status, retry_after, times]
        self.typing: list[str] = []
        self.callbacks: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.identified = 0
        self._sockets: set[WebSocket] = set()
        self._ids = itertools.count(1000)
        self._seq = itertools.count(1)
        self._recent: dict[str, deque[float]] = {}
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self.base = ""
        api = "/api/v10"
        self.app = Starlette(routes=[
            Route(f"{api}/users/@me", self._me), Route(f"{api}/gateway/bot", self._gateway),
            Route(f"{api}/channels/{{channel}}/messages", self._send, methods=["POST"]),
            Route(f"{api}/channels/{{channel}}/messages/{{message}}", self._edit, methods=["PATCH"]),
            Route(f"{api}/channels/{{channel}}/typing", self._typing, methods=["POST"]),
            Route(f"{api}/interactions/{{id}}/{{token}}/callback", self._callback, methods=["POST"]),
            WebSocketRoute("/gateway/", self._socket), WebSocketRoute("/gateway", self._socket)])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # --- what tests do --------------------------------------------------------------------

    async def push_message(self, channel: str, user: str, content: str, *, guild: str | None = None) -> str:
        message_id = str(next(self._ids))
        data: dict[str, Any] = {"id": message_id, "channel_id": channel, "content": content,
                                "author": {"id": user, "username": f"user{user}"}}
        if guild:
            data["guild_id"] = guild
        await self._dispatch("MESSAGE_CREATE", data)
        return message_id

    async def push_press(self, channel: str, user: str, message: Message, custom_id: str) -> None:
        await self._dispatch("INTERACTION_CREATE", {
            "id": str(next(self._ids)), "token": "itoken", "type": 3, "channel_id": channel,
            "user": {"id": user}, "message": {"id": message.id}, "data": {"custom_id": custom_id, "component_type": 2}})

    async def reconnect(self) -> None:
        """Ask the connected bot to reconnect (op 7), once one is connected."""
        await self.wait_for(lambda: bool(self._sockets))
        for socket in list(self._sockets):
            await socket.send_text(json.dumps({"op": 7, "d": None}))

    async def _dispatch(self, kind: str, data: dict[str, Any]) -> None:
        await self.wait_for(lambda: bool(self._sockets))
        for socket in list(self._sockets):
            await socket.send_text(json.dumps({"op": 0, "t": kind, "s": next(self._seq), "d": data}))

    def fail(self, path: str, status: int, *, retry_after: float | None = None, is_global: bool = False,
             times: int = 1) -> None:
        self.failures.append([path, status, retry_after, is_global, times])

    def texts(self, channel: str) -> list[str]:
        return [m.content for m in self.messages.get(channel, [])]

    def bot_messages(self, channel: str) -> list[Message]:
        return self.messages.get(channel, [])

    async def wait_for(self, predicate: Any) -> None:
        if predicate():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        finally:
            self._waiters.remove(entry)

    def _notify(self) -> None:
        for predicate, waiter in list(self._waiters):
            if not waiter.done() and predicate():
                waiter.set_result(None)

    # --- the gateway ----------------------------------------------------------------------

    async def _socket(self, socket: WebSocket) -> None:
        await socket.accept()
        try:
            await socket.send_text(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}}))
            identify = json.loads(await socket.receive_text())
            if identify.get("op") != 2 or identify["d"].get("token") != TOKEN:
                await socket.close(4004, "Authentication failed")
                return
            self.identified += 1
            await socket.send_text(json.dumps({"op": 0, "t": "READY", "s": next(self._seq),
                                               "d": {"user": {"id": BOT_ID, "bot": True}, "session_id": "s1"}}))
            self._sockets.add(socket)
            self._notify()
            while True:
                message = json.loads(await socket.receive_text())
                if message.get("op") == 1:
                    self.heartbeats += 1
                    await socket.send_text(json.dumps({"op": 11}))
                    self._notify()
        except WebSocketDisconnect:
            pass
        finally:
            self._sockets.discard(socket)
            self._notify()

    # --- REST -----------------------------------------------------------------------------

    def _check(self, request: Request, method: str) -> Response | None:
        self.calls.append((method, request.url.path, asyncio.get_running_loop().time()))
        if request.headers.get("authorization") != f"Bot {TOKEN}":
            return JSONResponse({"message": "401: Unauthorized", "code": 0}, status_code=401)
        for failure in self.failures:
            path, status, retry_after, is_global, times = failure
            if times > 0 and path in request.url.path:
                failure[4] = times - 1
                body: dict[str, Any] = {"message": "You are being rate limited." if status == 429 else "oops"}
                if retry_after is not None:
                    body.update(retry_after=retry_after, **{"global": is_global})
                return JSONResponse(body, status_code=status)
        return None

    async def _me(self, request: Request) -> Response:
        return self._check(request, "me") or JSONResponse({"id": BOT_ID, "username": "corral", "bot": True})

    async def _gateway(self, request: Request) -> Response:
        return self._check(request, "gateway") or JSONResponse(
            {"url": self.base.replace("http", "ws") + "/gateway", "shards": 1})

    def _count(self, channel: str) -> None:
        now = asyncio.get_running_loop().time()
        recent = self._recent.setdefault(channel, deque())
        while recent and now - recent[0] >= 5.0:
            recent.popleft()
        recent.append(now)
        if len(recent) > 5:
            self.violations.append(f"channel {channel}: {len(recent)} messages or edits within 5 s")

    async def _send(self, request: Request) -> Response:
        refused = self._check(request, "send")
        if refused:
            self._notify()
            return refused
        body = json.loads(await request.body())
        channel = request.path_params["channel"]
        if len(body.get("content", "")) > 2000:
            return JSONResponse({"message": "Invalid Form Body", "code": 50035}, status_code=400)
        self._count(channel)
        message = Message(str(next(self._ids)), channel, body.get("content", ""), body.get("components") or [])
        self.messages.setdefault(channel, []).append(message)
        self._notify()
        return JSONResponse({"id": message.id, "channel_id": channel, "content": message.content})

    async def _edit(self, request: Request) -> Response:
        refused = self._check(request, "edit")
        if refused:
            self._notify()
            return refused
        body = json.loads(await request.body())
        channel, message_id = request.path_params["channel"], request.path_params["message"]
        found = [m for m in self.messages.get(channel, []) if m.id == message_id]
        if not found:
            return JSONResponse({"message": "Unknown Message", "code": 10008}, status_code=404)
        self._count(channel)
        found[0].content = body.get("content", found[0].content)
        if "components" in body:
            found[0].components = body["components"]
        found[0].edits.append(found[0].content)
        self._notify()
        return JSONResponse({"id": message_id, "channel_id": channel, "content": found[0].content})

    async def _typing(self, request: Request) -> Response:
        refused = self._check(request, "typing")
        if refused:
            return refused
        self.typing.append(request.path_params["channel"])
        self._notify()
        return Response(status_code=204)

    async def _callback(self, request: Request) -> Response:
        self.callbacks.append(json.loads(await request.body()))
        self._notify()
        return Response(status_code=204)
