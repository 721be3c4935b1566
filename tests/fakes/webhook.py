"""The receiving end of a webhook channel: takes the replies Corral POSTs to ``callback_url``,
checks each signature, and keeps them; it can answer 429 (with Retry-After) or 5xx on cue."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from corral.channels.platforms.webhook import verify


@dataclass(frozen=True)
class Received:
    body: dict[str, Any]
    key: str
    at: float


class FakeReceiver:
    def __init__(self, secret: str):
        self.secret = secret
        self.received: list[Received] = []
        self.refused_signatures = 0
        self.answers: list[tuple[int, int | None]] = []  # (status, retry_after) to answer next, in order
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []

    def replies(self, chat_id: str) -> dict[str, str]:
        """Each reply message's latest text, by ``reply_id`` (as a chat shows it after edits)."""
        shown: dict[str, str] = {}
        for item in self.received:
            if item.body["chat_id"] == chat_id:
                shown[item.body["reply_id"]] = item.body["text"]
        return shown

    def finals(self, chat_id: str) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.body["chat_id"] == chat_id and r.body["final"]]

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        try:
            verify(self.secret, request.headers, body)
        except Exception:
            self.refused_signatures += 1
            response = JSONResponse({"error": "bad signature"}, status_code=401)
        else:
            if self.answers:
                status, retry_after = self.answers.pop(0)
                headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
                response = JSONResponse({"error": "not now"}, status_code=status, headers=headers)
            else:
                self.received.append(Received(json.loads(body), request.headers["x-corral-idempotency-key"],
                                              asyncio.get_running_loop().time()))
                response = JSONResponse({"ok": True})
        self._notify()
        await response(scope, receive, send)
