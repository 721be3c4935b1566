"""Telegram over the Bot API: long polling (getUpdates) or a webhook, replies by
sendMessage and editMessageText, approvals as inline keyboards.

Calls go to ``{base_url}{token}/{method}`` (python-telegram-bot's ``base_url`` semantics), so
a fake Bot API on loopback stands in for Telegram in tests. A plain httpx client: the
channel needs eight methods, and owning their errors lets it classify every answer (429 with
``parameters.retry_after``, 401 for a wrong token, 5xx) without a second event loop's worth
of framework. The token is part of every URL, so nothing raised here carries a URL.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from corral.channels.config import ChannelSpec
from corral.channels.errors import AuthRejected, Rejected, RetryAfter, Transient
from corral.channels.platforms.base import Delivery, Inbound, Take, hide_in_logs, redact, transport_error
from corral.errors import InvalidInput, Unauthorized

log = logging.getLogger(__name__)

ALLOWED_UPDATES = ["message", "callback_query"]
SEND_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=4)
RECEIVE_BACKOFF_MAX_S = 60.0


class Telegram:
    wants_final = False

    def __init__(self, spec: ChannelSpec):
        self.spec = spec
        self._token = spec.secret("token_env")
        hide_in_logs(self._token)
        self._secret = spec.secret("secret_env") if spec.transport == "webhook" else ""
        self._base = f"{spec.api_base}{self._token}/"
        # Two clients: the long poll holds a connection for up to poll_timeout_s, and a pool that
        # stays small is cheap (httpcore checks every idle connection of its pool per request).
        self._http = httpx.AsyncClient(timeout=spec.request_timeout_s, limits=SEND_LIMITS)
        self._poll = httpx.AsyncClient(timeout=spec.request_timeout_s, limits=httpx.Limits(max_connections=1))
        self.username: str | None = None

    def __repr__(self) -> str:
        return f"<Telegram {self.spec.name} @{self.username}>"

    async def call(self, method: str, params: dict[str, Any] | None = None, *, wait_s: float | None = None,
                   client: httpx.AsyncClient | None = None) -> Any:
        """One Bot API method; its ``result``, or a classified error. ``wait_s``: how long it may
        take (a long poll's own timeout and then some), else ``request_timeout_s``."""
        try:
            response = await (client or self._http).post(self._base + method, json=params or {},
                                             timeout=wait_s or self.spec.request_timeout_s)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._token) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code == 200 and body.get("ok"):
            return body.get("result")
        code = int(body.get("error_code") or response.status_code)
        what = redact(str(body.get("description") or f"HTTP {response.status_code}"), self._token)
        message = f"{method}: {what}"
        if code == 429:
            parameters = body.get("parameters") or {}
            retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
            raise RetryAfter(message, float(retry_after) if isinstance(retry_after, int | float) else 1.0)
        if code == 401 or (code == 404 and method == "getMe"):
            raise AuthRejected(f"{message} (is the token right?)")
        if code >= 500 or response.status_code >= 500:
            raise Transient(message)
        raise Rejected(message)

    async def start(self) -> None:
        me = await self.call("getMe")
        self.username = str(me.get("username") or "") if isinstance(me, dict) else None
        if self.spec.transport == "polling":
            await self.call("deleteWebhook")  # getUpdates is refused while a webhook is set
        elif self.spec.webhook_url:
            await self.call("setWebhook", {"url": self.spec.webhook_url, "secret_token": self._secret,
                                           "allowed_updates": ALLOWED_UPDATES})

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        if self.spec.transport != "polling":
            await asyncio.Event().wait()  # Telegram pushes to the webhook route
        offset: int | None = None
        delay = 1.0
        timeout = self.spec.poll_timeout_s
        while True:
            params: dict[str, Any] = {"timeout": timeout, "allowed_updates": ALLOWED_UPDATES}
            if offset is not None:
                params["offset"] = offset
            try:
                updates = await self.call("getUpdates", params, wait_s=timeout + self.spec.request_timeout_s,
                                          client=self._poll)
            except (Transient, RetryAfter) as exc:
                on_trouble(exc)
                wait = exc.retry_after if isinstance(exc, RetryAfter) else delay
                delay = min(delay * 2, RECEIVE_BACKOFF_MAX_S)
                await asyncio.sleep(wait)
                continue
            on_trouble(None)
            delay = 1.0
            if not isinstance(updates, list) or not updates:
                continue
            # Acknowledged (by the next offset) only once every message of the batch is taken in.
            await take([inbound for update in updates for inbound in self.parse_update(update)])
            offset = max(int(update["update_id"]) for update in updates) + 1

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        given = headers.get("x-telegram-bot-api-secret-token", "")
        if not self._secret or not hmac.compare_digest(given.encode(), self._secret.encode()):
            raise Unauthorized("x-telegram-bot-api-secret-token does not match the channel's secret")
        try:
            update = json.loads(body)
        except ValueError:
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
            raise InvalidInput("the body is not a Telegram update")
        return self.parse_update(update)

    def parse_update(self, update: dict[str, Any]) -> list[Inbound]:
        """The messages of one update (none for kinds the channel does not handle)."""
        message, press = update.get("message"), update.get("callback_query")
        try:
            if isinstance(message, dict) and isinstance(message.get("text"), str):
                chat, sender = message["chat"], message.get("from") or {}
                thread = message.get("message_thread_id") if message.get("is_topic_message") else None
                return [Inbound(key=f"{chat['id']}:{message['message_id']}", chat_id=str(chat["id"]),
                                user_id=str(sender.get("id", "")), text=self._own_command(message["text"]),
                                message_id=str(message["message_id"]),
                                thread_id=str(thread) if thread is not None else None,
                                is_dm=chat.get("type") == "private")]
            if isinstance(press, dict) and isinstance(press.get("data"), str):
                message = press.get("message") or {}
                chat = message.get("chat") or {}
                return [Inbound(key=f"cb:{press['id']}", chat_id=str(chat.get("id", "")),
                                user_id=str(press["from"]["id"]), message_id=str(message.get("message_id", "")),
                                is_dm=chat.get("type") == "private", button=press["data"], press_id=str(press["id"]))]
        except (KeyError, TypeError):
            log.warning("a Telegram update the channel could not read: update_id %s", update.get("update_id"))
        return []

    def _own_command(self, text: str) -> str:
        """``/stop@thisbot`` is ``/stop``; a command addressed to another bot stays as it is."""
        head, _, rest = text.partition(" ")
        command, at, bot = head.partition("@")
        if at and command.startswith("/") and self.username and bot.lower() == self.username.lower():
            return command + (" " + rest if rest else "")
        return text

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        params: dict[str, Any] = {"chat_id": delivery.chat_id}
        if delivery.kind == "answer":
            params = {"callback_query_id": delivery.extra["press_id"]}
            if delivery.text:
                params["text"] = delivery.text
            await self.call("answerCallbackQuery", params)
            return None
        params["text"] = delivery.text
        buttons = delivery.buttons
        if buttons or delivery.kind == "edit":
            params["reply_markup"] = {"inline_keyboard": [[{"text": label, "callback_data": data}
                                                           for label, data in buttons]] if buttons else []}
        if delivery.kind == "edit":
            params["message_id"] = int(target_id) if target_id and target_id.isdigit() else target_id
            try:
                await self.call("editMessageText", params)
            except Rejected as exc:
                if "message is not modified" not in str(exc):  # Telegram's only signal of a no-op edit
                    raise
            return target_id
        if delivery.thread_id is not None:
            params["message_thread_id"] = int(delivery.thread_id)
        result = await self.call("sendMessage", params)
        return str(result["message_id"]) if isinstance(result, dict) and "message_id" in result else None

    async def typing(self, chat_id: str, thread_id: str | None) -> None:
        params: dict[str, Any] = {"chat_id": chat_id, "action": "typing"}
        if thread_id is not None:
            params["message_thread_id"] = int(thread_id)
        await self.call("sendChatAction", params)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._poll.aclose()
