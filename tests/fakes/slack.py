"""A fake Slack: the Web API (``POST /api/{method}``) and a Socket Mode websocket.

``apps.connections.open`` (with the app token) answers the URL of this fake's socket; tests
push messages and button presses as Socket Mode envelopes (``push_message``, ``push_press``),
and the fake records which envelopes the app acknowledged. It keeps each channel's messages
with their updates, counts rate-limit violations (chat.postMessage and chat.update: one a
second per channel), and answers failures on cue (``fail``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

BOT_TOKEN = "xoxb-test-bot-token-never-logged"
APP_TOKEN = "xapp-test-app-token-never-logged"
BOT_USER = "UBOT"
COUNTED = frozenset({"chat.postMessage", "chat.update"})


@dataclass
class Message:
    ts: str
    channel: str
    text: str
    blocks: list[dict[str, Any]] | None
    thread_ts: str | None
    updates: list[str] = field(default_factory=list)

    @property
    def buttons(self) -> list[tuple[str, str]]:
        return [(e["text"]["text"], e["value"]) for b in self.blocks or [] if b["type"] == "actions"
                for e in b["elements"]]


class FakeSlack:
    def __init__(self, *, chat_interval_s: float = 1.0):
        self.chat_interval_s = chat_interval_s
        self.messages: dict[str, list[Message]] = {}
        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.violations: list[str] = []
        self.failures: list[tuple[str | None, int, int | None, int]] = []
        self.acked: list[str] = []
        self.connections = 0
        self._sockets: set[WebSocket] = set()
        self._ts = itertools.count(1)
        self._envelopes = itertools.count(1)
        self._last: dict[str, float] = {}
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self.base = ""
        self.app = Starlette(routes=[Route("/api/{method}", self._api, methods=["POST"]),
                                     WebSocketRoute("/socket", self._socket)])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # --- what tests do --------------------------------------------------------------------

    async def push_message(self, channel: str, user: str, text: str, *, channel_type: str = "im",
                           ts: str | None = None, thread_ts: str | None = None, retry: int = 0) -> dict[str, Any]:
        event: dict[str, Any] = {"type": "message", "channel": channel, "user": user, "text": text,
                                 "ts": ts or f"{next(self._ts)}.000200", "channel_type": channel_type}
        if thread_ts:
            event["thread_ts"] = thread_ts
        await self._send({"type": "events_api", "retry_attempt": retry,
                          "payload": {"type": "event_callback", "event_id": f"Ev{event['ts']}", "event": event}})
        return event

    async def push_press(self, channel: str, user: str, message: Message, value: str) -> None:
        await self._send({"type": "interactive", "payload": {
            "type": "block_actions", "user": {"id": user}, "channel": {"id": channel}, "message": {"ts": message.ts},
            "actions": [{"action_id": "corral_0", "value": value, "action_ts": f"{next(self._ts)}.5"}]}})

    async def disconnect(self) -> None:
        """Ask the app for a fresh connection, as Slack does now and then."""
        for socket in list(self._sockets):
            await socket.send_text(json.dumps({"type": "disconnect", "reason": "refresh_requested"}))

    async def _send(self, envelope: dict[str, Any]) -> None:
        await self.wait_for(lambda: bool(self._sockets))
        envelope["envelope_id"] = f"env{next(self._envelopes)}"
        for socket in list(self._sockets):
            await socket.send_text(json.dumps(envelope))

    def fail(self, method: str | None, status: int, *, retry_after: int | None = None, times: int = 1) -> None:
        self.failures.append((method, status, retry_after, times))

    def texts(self, channel: str) -> list[str]:
        return [m.text for m in self.messages.get(channel, [])]

    def bot_messages(self, channel: str) -> list[Message]:
        return self.messages.get(channel, [])

    def count(self, method: str) -> int:
        return sum(1 for name, _, _ in self.calls if name == method)

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

    # --- Socket Mode ----------------------------------------------------------------------

    async def _socket(self, socket: WebSocket) -> None:
        await socket.accept()
        self._sockets.add(socket)
        self.connections += 1
        self._notify()
        try:
            await socket.send_text(json.dumps({"type": "hello", "num_connections": 1}))
            while True:
                ack = json.loads(await socket.receive_text())
                self.acked.append(ack["envelope_id"])
                self._notify()
        except WebSocketDisconnect:
            pass
        finally:
            self._sockets.discard(socket)
            self._notify()

    # --- the Web API ----------------------------------------------------------------------

    async def _api(self, request: Request) -> JSONResponse:
        method = request.path_params["method"]
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        params = json.loads(await request.body() or b"{}")
        loop = asyncio.get_running_loop()
        self.calls.append((method, params, loop.time()))
        try:
            for index, (name, status, retry_after, times) in enumerate(self.failures):
                if times > 0 and name in (None, method):
                    self.failures[index] = (name, status, retry_after, times - 1)
                    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
                    return JSONResponse({"ok": False, "error": "ratelimited" if status == 429 else "fatal_error"},
                                        status_code=status, headers=headers)
            if method == "apps.connections.open":
                if token != APP_TOKEN:
                    return JSONResponse({"ok": False, "error": "invalid_auth"})
                return JSONResponse({"ok": True, "url": self.base.replace("http", "ws") + "/socket"})
            if token != BOT_TOKEN:
                return JSONResponse({"ok": False, "error": "invalid_auth"})
            if method == "auth.test":
                return JSONResponse({"ok": True, "user_id": BOT_USER, "team": "T1"})
            if method in COUNTED:
                self._count(method, str(params["channel"]))
            if method == "chat.postMessage":
                message = Message(f"{next(self._ts)}.000100", params["channel"], params["text"], params.get("blocks"),
                                  params.get("thread_ts"))
                self.messages.setdefault(message.channel, []).append(message)
                return JSONResponse({"ok": True, "channel": message.channel, "ts": message.ts})
            if method == "chat.update":
                found = [m for m in self.messages.get(params["channel"], []) if m.ts == params["ts"]]
                if not found:
                    return JSONResponse({"ok": False, "error": "message_not_found"})
                found[0].text = params["text"]
                if "blocks" in params:
                    found[0].blocks = params["blocks"]
                found[0].updates.append(params["text"])
                return JSONResponse({"ok": True, "channel": params["channel"], "ts": params["ts"]})
            return JSONResponse({"ok": False, "error": "unknown_method"})
        finally:
            self._notify()

    def _count(self, method: str, channel: str) -> None:
        now = asyncio.get_running_loop().time()
        last = self._last.get(channel)
        if last is not None and now - last < self.chat_interval_s:
            self.violations.append(f"{channel}: {method} {now - last:.3f} s after the previous one")
        self._last[channel] = now
