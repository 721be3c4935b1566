"""Discord: the gateway (a websocket: Hello, Identify, heartbeats, MESSAGE_CREATE and
INTERACTION_CREATE dispatches) for messages in, the REST API for replies, approvals as
message components (buttons).

REST calls go to ``base_url`` (default ``https://discord.com/api/v10``) with ``Authorization:
Bot TOKEN``; the gateway's URL is ``gateway_url`` or what ``GET /gateway/bot`` answers. The
connection heartbeats at the interval Hello gives and reconnects (a fresh Identify) when
Discord asks (op 7, op 9), when a heartbeat goes unacknowledged, or when the socket drops; a
close for a refused token (4004) fails the channel. Discord does not redeliver gateway events,
so a message is taken in as it arrives (and de-duplicated by its id all the same). A button
press is acknowledged through the outbox's answer lane: an ephemeral reply to the presser,
well within Discord's 3 s. A plain httpx + websockets client, as for Slack: discord.py would
bring its own event loop policy, cache and intents machinery for six calls and one socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform as host
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from corral.channels.config import ChannelSpec
from corral.channels.errors import AuthRejected, Rejected, RetryAfter, Transient
from corral.channels.platforms.base import Delivery, Inbound, Take, hide_in_logs, redact, transport_error

log = logging.getLogger(__name__)

# GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
INTENTS = (1 << 9) | (1 << 12) | (1 << 15)
AUTH_FAILED_CLOSE = 4004
RECEIVE_BACKOFF_MAX_S = 60.0
# Interaction callback types: an ephemeral message to the one who pressed.
CHANNEL_MESSAGE, EPHEMERAL = 4, 1 << 6


class Discord:
    wants_final = False

    def __init__(self, spec: ChannelSpec):
        self.spec = spec
        self._token = spec.secret("token_env")
        hide_in_logs(self._token)
        self._base = (spec.api_base or "").rstrip("/")
        self._http = httpx.AsyncClient(timeout=spec.request_timeout_s,
                                       headers={"authorization": f"Bot {self._token}"})
        self.bot_user: str | None = None

    def __repr__(self) -> str:
        return f"<Discord {self.spec.name} bot={self.bot_user}>"

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, self._base + path, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._token) from None
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        what = f"{method} {path.split('?')[0]}"
        if response.status_code == 429:
            info = data if isinstance(data, dict) else {}
            seconds = info.get("retry_after") or response.headers.get("retry-after") or 1.0
            raise RetryAfter(f"{what}: HTTP 429", float(seconds), whole_channel=bool(info.get("global")))
        if response.status_code == 401:
            raise AuthRejected(f"{what}: HTTP 401 (is the token right?)")
        if response.status_code >= 500:
            raise Transient(f"{what}: HTTP {response.status_code}")
        if response.status_code >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            raise Rejected(redact(f"{what}: HTTP {response.status_code} {message or ''}".strip(), self._token))
        return data

    async def start(self) -> None:
        me = await self.call("GET", "/users/@me")
        self.bot_user = str(me.get("id")) if isinstance(me, dict) else None

    # --- in --------------------------------------------------------------------------------

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        from websockets.exceptions import ConnectionClosed, WebSocketException

        delay = 1.0
        while True:
            try:
                await self._session(take, on_trouble)
                problem: Exception = Transient("the gateway asked for a new connection")
                delay = 1.0
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else None
                if code == AUTH_FAILED_CLOSE:
                    raise AuthRejected("the gateway refused the token (close 4004)") from None
                problem = Transient(f"the gateway closed the connection ({code})")
            except (Transient, RetryAfter) as exc:
                problem = exc
            except (OSError, WebSocketException, TimeoutError, ValueError, KeyError) as exc:
                problem = Transient(f"gateway: {type(exc).__name__}: {redact(str(exc), self._token)}")
            on_trouble(problem)
            await asyncio.sleep(problem.retry_after if isinstance(problem, RetryAfter) else delay)
            delay = min(delay * 2, RECEIVE_BACKOFF_MAX_S)

    async def _session(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        """One gateway connection, from Hello to the close; returns when Discord asks for a new one."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        url = self.spec.gateway_url or str((await self.call("GET", "/gateway/bot"))["url"])
        async with connect(f"{url.rstrip('/')}/?v=10&encoding=json", open_timeout=self.spec.request_timeout_s,
                           max_size=2**22) as socket:
            hello = json.loads(await asyncio.wait_for(socket.recv(), self.spec.request_timeout_s))
            interval = float(hello["d"]["heartbeat_interval"]) / 1000
            await socket.send(json.dumps({"op": 2, "d": {
                "token": self._token, "intents": INTENTS,
                "properties": {"os": host.system().lower(), "browser": "corral", "device": "corral"}}}))
            state: dict[str, Any] = {"seq": None, "acked": True}

            async def heartbeat() -> None:
                try:
                    while True:
                        await asyncio.sleep(interval)
                        if not state["acked"]:
                            await socket.close(4000, "no heartbeat acknowledgement")  # a zombie connection
                            return
                        state["acked"] = False
                        await socket.send(json.dumps({"op": 1, "d": state["seq"]}))
                except ConnectionClosed:
                    return  # the reading loop sees the close too, and ends the session

            async with asyncio.TaskGroup() as group:
                beating = group.create_task(heartbeat())
                try:
                    async for raw in socket:
                        message = json.loads(raw)
                        if message.get("s") is not None:
                            state["seq"] = message["s"]
                        op = message.get("op")
                        if op == 11:
                            state["acked"] = True
                        elif op == 1:
                            await socket.send(json.dumps({"op": 1, "d": state["seq"]}))
                        elif op in (7, 9):
                            return  # reconnect (7) or an invalid session (9): a fresh Identify
                        elif op == 0:
                            await self._dispatch(message.get("t"), message.get("d") or {}, take, on_trouble)
                finally:
                    beating.cancel()

    async def _dispatch(self, kind: str | None, data: dict[str, Any], take: Take,
                        on_trouble: Callable[[Exception | None], None]) -> None:
        if kind == "READY":
            self.bot_user = str((data.get("user") or {}).get("id") or self.bot_user)
            on_trouble(None)
        elif kind == "MESSAGE_CREATE":
            author = data.get("author") or {}
            if author.get("bot") or str(author.get("id")) == self.bot_user or not data.get("content"):
                return
            text = str(data["content"])
            if self.bot_user:
                text = text.replace(f"<@{self.bot_user}>", "").strip()
            await take([Inbound(key=f"m:{data['id']}", chat_id=str(data["channel_id"]), user_id=str(author["id"]),
                                text=text, message_id=str(data["id"]), is_dm=data.get("guild_id") is None)])
        elif kind == "INTERACTION_CREATE" and data.get("type") == 3:  # a message component: our buttons
            user = (data.get("member") or {}).get("user") or data.get("user") or {}
            custom = (data.get("data") or {}).get("custom_id")
            if isinstance(custom, str) and user.get("id"):
                await take([Inbound(key=f"i:{data['id']}", chat_id=str(data.get("channel_id")),
                                    user_id=str(user["id"]), message_id=str((data.get("message") or {}).get("id")),
                                    is_dm=data.get("guild_id") is None, button=custom,
                                    press_id=f"{data['id']}/{data['token']}")])

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        return []  # Discord has no push route here: everything comes over the gateway

    # --- out -------------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        if delivery.kind == "answer":
            await self.call("POST", f"/interactions/{delivery.extra['press_id']}/callback",
                            {"type": CHANNEL_MESSAGE, "data": {"content": delivery.text or "OK", "flags": EPHEMERAL}})
            return None
        body: dict[str, Any] = {"content": delivery.text, "allowed_mentions": {"parse": []}}
        if delivery.buttons or delivery.kind == "edit":
            body["components"] = _components(delivery.buttons)
        if delivery.kind == "edit":
            await self.call("PATCH", f"/channels/{delivery.chat_id}/messages/{target_id}", body)
            return target_id
        sent = await self.call("POST", f"/channels/{delivery.chat_id}/messages", body)
        return str(sent["id"]) if isinstance(sent, dict) and "id" in sent else None

    async def typing(self, chat_id: str, thread_id: str | None) -> None:
        await self.call("POST", f"/channels/{chat_id}/typing")

    async def aclose(self) -> None:
        await self._http.aclose()


def _components(buttons: list[tuple[str, str]]) -> list[dict[str, Any]]:
    if not buttons:
        return []
    styles = [3, 4]  # success (green), danger (red)
    return [{"type": 1, "components": [
        {"type": 2, "style": styles[index] if index < len(styles) else 2, "label": label[:80], "custom_id": data}
        for index, (label, data) in enumerate(buttons)]}]
