"""A fake Telegram Bot API: ``POST /bot{token}/{method}``, as the real one answers it.

It keeps each chat's messages (with every edit), hands out updates by ``getUpdates`` (long
polling, offsets confirming) and records every call with its time. It counts rate-limit
violations as Telegram's Bot FAQ states the limits: two messages or edits in one chat less
than ``chat_interval_s`` apart, more than ``global_per_s`` in any second. Failures on cue:
``fail(method, status, retry_after, times)``, ``down()`` (every call 502), ``hang()`` (every
call waits until ``release()``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

COUNTED = frozenset({"sendMessage", "editMessageText", "editMessageReplyMarkup"})
TOKEN = "123456:TEST-token-never-logged"


@dataclass
class Message:
    message_id: int
    chat_id: str
    text: str
    reply_markup: dict[str, Any] | None
    edits: list[str] = field(default_factory=list)

    @property
    def buttons(self) -> list[tuple[str, str]]:
        rows = (self.reply_markup or {}).get("inline_keyboard") or []
        return [(b["text"], b["callback_data"]) for row in rows for b in row]


@dataclass(frozen=True)
class Call:
    method: str
    params: dict[str, Any]
    at: float
    chat_id: str | None


@dataclass
class Failure:
    method: str | None
    status: int
    retry_after: int | None
    times: int


class FakeTelegram:
    def __init__(self, tokens: tuple[str, ...] = (TOKEN,), *, chat_interval_s: float = 1.0, global_per_s: int = 30,
                 username: str = "corral_test_bot"):
        self.tokens = set(tokens)
        self.chat_interval_s = chat_interval_s
        self.global_per_s = global_per_s
        self.username = username
        self.updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: dict[str, itertools.count[int]] = {}
        self.messages: dict[str, list[Message]] = {}
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.failures: list[Failure] = []
        self.is_down = False
        self.closing = False
        self._released = asyncio.Event()
        self._released.set()
        self._last_in_chat: dict[str, float] = {}
        self._recent: deque[float] = deque()
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self.webhook: str | None = None
        self.answered: list[dict[str, Any]] = []
        self.typing: list[str] = []

    def __repr__(self) -> str:
        sent = sum(len(m) for m in self.messages.values())
        return f"<FakeTelegram chats={len(self.messages)} messages={sent} calls={len(self.calls)} " \
               f"violations={len(self.violations)}>"

    # --- what tests do --------------------------------------------------------------------

    def push_text(self, chat_id: int | str, user_id: int | str, text: str, *, chat_type: str = "private",
                  message_id: int | None = None, thread_id: int | None = None) -> dict[str, Any]:
        chat = str(chat_id)
        if message_id is None:
            message_id = next(self._ids(chat))
        message: dict[str, Any] = {"message_id": message_id, "date": 0, "text": text,
                                   "chat": {"id": int(chat_id), "type": chat_type},
                                   "from": {"id": int(user_id), "is_bot": False, "first_name": f"user{user_id}"}}
        if thread_id is not None:
            message.update(message_thread_id=thread_id, is_topic_message=True)
        return self._push({"message": message})

    def push_press(self, chat_id: int | str, user_id: int | str, message: Message, data: str) -> dict[str, Any]:
        press = {"id": f"cb{next(self._update_ids)}", "data": data, "chat_instance": "x",
                 "from": {"id": int(user_id), "is_bot": False, "first_name": f"user{user_id}"},
                 "message": {"message_id": message.message_id, "date": 0, "text": message.text,
                             "chat": {"id": int(chat_id), "type": "private"}}}
        return self._push({"callback_query": press})

    def redeliver(self, update: dict[str, Any]) -> dict[str, Any]:
        """The same message again, as Telegram sends one whose delivery it believes failed."""
        again = {k: v for k, v in update.items() if k != "update_id"}
        return self._push(again)

    def _push(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self.updates.append(update)
        self._notify()
        return update

    def _ids(self, chat: str) -> itertools.count[int]:
        return self._message_ids.setdefault(chat, itertools.count(1))

    def fail(self, method: str | None, status: int, *, retry_after: int | None = None, times: int = 1) -> None:
        self.failures.append(Failure(method, status, retry_after, times))

    def close(self) -> None:
        """End every long poll and hang: the server is about to stop."""
        self.closing = True
        self._released.set()
        self._notify()

    def down(self) -> None:
        self.is_down = True

    def up(self) -> None:
        self.is_down = False

    def hang(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def bot_messages(self, chat_id: int | str) -> list[Message]:
        return self.messages.get(str(chat_id), [])

    def texts(self, chat_id: int | str) -> list[str]:
        return [m.text for m in self.bot_messages(chat_id)]

    def count(self, method: str, chat_id: int | str | None = None) -> int:
        return sum(1 for c in self.calls if c.method == method and (chat_id is None or c.chat_id == str(chat_id)))

    async def wait_for(self, predicate: Any) -> None:
        """Until ``predicate()`` holds (checked as every call arrives and is answered, and after
        every update pushed); the caller's ``asyncio.timeout`` bounds it."""
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

    # --- the Bot API ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        response = await self._answer(request)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> JSONResponse:
        parts = request.url.path.strip("/").split("/")
        if len(parts) != 2 or not parts[0].startswith("bot"):
            return _error(404, "Not Found")
        token, method = parts[0][3:], parts[1]
        await self._released.wait()
        if token not in self.tokens:
            return _error(401, "Unauthorized")
        try:
            raw = await request.body()
            params: dict[str, Any] = json.loads(raw) if raw else dict(request.query_params)
        except ValueError:
            return _error(400, "Bad Request: can't parse JSON")
        loop = asyncio.get_running_loop()
        if method != "getUpdates":
            chat = params.get("chat_id")
            self.calls.append(Call(method, params, loop.time(), str(chat) if chat is not None else None))
        self._notify()  # a call arriving says the channel is done with what came before (a batch taken)
        if self.is_down:
            self._notify()
            return _error(502, "Bad Gateway")
        for failure in self.failures:
            if failure.times > 0 and failure.method in (None, method):
                failure.times -= 1
                self._notify()
                return _error(failure.status, "Too Many Requests" if failure.status == 429 else "Internal Error",
                              retry_after=failure.retry_after)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        try:
            result = await handler(params) if method == "getUpdates" else handler(params)
        except _BadRequest as exc:
            return _error(400, f"Bad Request: {exc}")
        except _Down:
            return _error(502, "Bad Gateway")
        finally:
            self._notify()
        return JSONResponse({"ok": True, "result": result})

    def _count(self, method: str, chat: str) -> None:
        if method not in COUNTED:
            return
        now = asyncio.get_running_loop().time()
        last = self._last_in_chat.get(chat)
        if last is not None and now - last < self.chat_interval_s:
            self.violations.append(f"chat {chat}: {method} {now - last:.3f} s after the previous one")
        self._last_in_chat[chat] = now
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        self._recent.append(now)
        if len(self._recent) > self.global_per_s:
            self.violations.append(f"{len(self._recent)} calls within a second (limit {self.global_per_s})")

    def _m_getMe(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"id": 123456, "is_bot": True, "first_name": "Corral", "username": self.username}

    def _m_deleteWebhook(self, params: dict[str, Any]) -> bool:
        self.webhook = None
        return True

    def _m_setWebhook(self, params: dict[str, Any]) -> bool:
        self.webhook = params.get("url")
        return True

    async def _m_getUpdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        timeout = float(params.get("timeout") or 0)
        if not self.updates and timeout:
            try:
                async with asyncio.timeout(timeout):
                    await self.wait_for(lambda: bool(self.updates) or self.is_down or self.closing)
            except TimeoutError:
                pass
        if self.is_down:
            raise _Down  # went down during the long poll: a 502, as every call gets while down
        return list(self.updates[:100])

    def _m_sendMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = str(params["chat_id"])
        text = str(params.get("text") or "")
        if not text:
            raise _BadRequest("message text is empty")
        if len(text) > 4096:
            raise _BadRequest("message is too long")
        self._count("sendMessage", chat)
        message = Message(next(self._ids(chat)), chat, text, params.get("reply_markup"))
        self.messages.setdefault(chat, []).append(message)
        return {"message_id": message.message_id, "date": 0, "text": text, "chat": {"id": params["chat_id"]}}

    def _m_editMessageText(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = str(params["chat_id"])
        found = [m for m in self.messages.get(chat, []) if m.message_id == int(params["message_id"])]
        if not found:
            raise _BadRequest("message to edit not found")
        message = found[0]
        text = str(params.get("text") or "")
        if len(text) > 4096:
            raise _BadRequest("message is too long")
        markup = params.get("reply_markup")
        if text == message.text and (markup or {}).get("inline_keyboard") == (message.reply_markup or {}).get(
                "inline_keyboard"):
            raise _BadRequest("message is not modified: specified new message content and reply markup are exactly "
                              "the same as a current content and reply markup of the message")
        self._count("editMessageText", chat)
        message.edits.append(text)
        message.text, message.reply_markup = text, markup
        return {"message_id": message.message_id, "date": 0, "text": text, "chat": {"id": params["chat_id"]}}

    def _m_sendChatAction(self, params: dict[str, Any]) -> bool:
        self.typing.append(str(params["chat_id"]))
        return True

    def _m_answerCallbackQuery(self, params: dict[str, Any]) -> bool:
        self.answered.append(params)
        return True


class _BadRequest(Exception):
    pass


class _Down(Exception):
    pass


def _error(status: int, description: str, *, retry_after: int | None = None) -> JSONResponse:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    headers = {}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
        headers["retry-after"] = str(retry_after)
    return JSONResponse(body, status_code=status, headers=headers)
