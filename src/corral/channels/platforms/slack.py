"""Slack: Socket Mode (a websocket the app opens; no public address) or the Events API (Slack
POSTs to ``/v1/channels/{name}/slack/events``); replies by chat.postMessage and chat.update,
approvals as Block Kit buttons.

Web API calls go to ``{base_url}{method}`` (slack_sdk's ``base_url``, default
``https://slack.com/api/``) with the bot token; Socket Mode asks ``apps.connections.open``
(with the app-level token) for its websocket URL, and acknowledges each envelope once what it
carried is durable, so Slack sends again what a crash cut off. The Events API's requests are
checked by their signature (``v0=HMAC_SHA256(signing_secret, "v0:" + timestamp + ":" + body)``,
timestamps older than 5 minutes refused); a retry (``x-slack-retry-num``) carries the same
message and is dropped as a duplicate. A plain httpx and websockets client: the channel needs
four Web API methods and the envelope protocol, and owning them lets every answer be
classified (429 ``Retry-After``, ``invalid_auth``, 5xx).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import httpx

from corral.channels.config import ChannelSpec
from corral.channels.errors import AuthRejected, ChannelError, Rejected, RetryAfter, Transient
from corral.channels.platforms.base import Delivery, Inbound, Take, hide_in_logs, redact, transport_error
from corral.errors import InvalidInput, Unauthorized

log = logging.getLogger(__name__)

AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})
MAX_SKEW_S = 300
RECEIVE_BACKOFF_MAX_S = 60.0


class UrlVerification(ChannelError):
    """Slack checking the Events API's request URL: the route answers the challenge."""

    code = "slack_url_verification"

    def __init__(self, challenge: str):
        super().__init__("url_verification")
        self.challenge = challenge


class Slack:
    wants_final = False

    def __init__(self, spec: ChannelSpec):
        self.spec = spec
        self._token = spec.secret("token_env")
        self._app_token = spec.secret("app_token_env") if spec.transport == "socket" else ""
        self._signing = spec.secret("signing_secret_env") if spec.transport == "events" else ""
        for secret in (self._token, self._app_token, self._signing):
            hide_in_logs(secret)
        base = spec.api_base or ""
        self._base = base if base.endswith("/") else base + "/"
        self._http = httpx.AsyncClient(timeout=spec.request_timeout_s)
        self.bot_user: str | None = None

    def __repr__(self) -> str:
        return f"<Slack {self.spec.name} {self.spec.transport} bot={self.bot_user}>"

    async def call(self, method: str, params: dict[str, Any] | None = None, *, app: bool = False) -> dict[str, Any]:
        token = self._app_token if app else self._token
        secrets = (self._token, self._app_token)
        try:
            response = await self._http.post(self._base + method, json=params or {},
                                             headers={"authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise transport_error(exc, *secrets) from None
        if response.status_code == 429:
            raise RetryAfter(f"{method}: HTTP 429", _seconds(response.headers.get("retry-after")), whole_channel=True)
        if response.status_code >= 500:
            raise Transient(f"{method}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Transient(f"{method}: HTTP {response.status_code} without a JSON body")
        if body.get("ok"):
            return body
        error = redact(str(body.get("error") or f"HTTP {response.status_code}"), *secrets)
        if error in AUTH_ERRORS:
            raise AuthRejected(f"{method}: {error} (is the token right?)")
        if error == "ratelimited":
            raise RetryAfter(f"{method}: ratelimited", _seconds(response.headers.get("retry-after")),
                             whole_channel=True)
        raise Rejected(f"{method}: {error}")

    async def start(self) -> None:
        me = await self.call("auth.test")
        self.bot_user = str(me.get("user_id") or "") or None

    # --- in --------------------------------------------------------------------------------

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        if self.spec.transport != "socket":
            await asyncio.Event().wait()  # Slack pushes to the Events API route
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        delay = 1.0
        while True:
            try:
                url = str((await self.call("apps.connections.open", app=True))["url"])
                async with connect(url, open_timeout=self.spec.request_timeout_s, max_size=2**22) as socket:
                    async for raw in socket:
                        envelope = json.loads(raw)
                        kind = envelope.get("type")
                        if kind == "hello":
                            on_trouble(None)
                            delay = 1.0
                        elif kind == "disconnect":
                            break  # Slack asks for a fresh connection (a refresh, a deploy)
                        elif envelope.get("envelope_id"):
                            # Acknowledged only once taken in: unacknowledged, Slack sends it again.
                            await take(self._envelope(envelope))
                            await socket.send(json.dumps({"envelope_id": envelope["envelope_id"]}))
            except (Transient, RetryAfter, OSError, WebSocketException, TimeoutError, ValueError) as exc:
                problem = exc if isinstance(exc, Transient | RetryAfter) else Transient(
                    f"Socket Mode: {type(exc).__name__}: {redact(str(exc), self._app_token)}")
                on_trouble(problem)
                await asyncio.sleep(problem.retry_after if isinstance(problem, RetryAfter) else delay)
                delay = min(delay * 2, RECEIVE_BACKOFF_MAX_S)

    def _envelope(self, envelope: dict[str, Any]) -> list[Inbound]:
        payload = envelope.get("payload") or {}
        if envelope.get("type") == "events_api":
            return self._event(payload.get("event") or {})
        if envelope.get("type") == "interactive":
            return self._actions(payload)
        return []

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        self._verify(headers, body)
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            payload = parse_qs(body.decode(errors="replace")).get("payload", [""])[0]
            try:
                return self._actions(json.loads(payload))
            except ValueError:
                raise InvalidInput("the interactive payload is not JSON") from None
        try:
            data = json.loads(body)
        except ValueError:
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("the body is not a Slack event")
        if data.get("type") == "url_verification":
            raise UrlVerification(str(data.get("challenge", "")))
        if data.get("type") == "event_callback":
            return self._event(data.get("event") or {})
        return []

    def _verify(self, headers: Mapping[str, str], body: bytes) -> None:
        stamp = headers.get("x-slack-request-timestamp", "")
        try:
            age = abs(time.time() - int(stamp))
        except ValueError:
            raise Unauthorized("x-slack-request-timestamp is missing") from None
        if age > MAX_SKEW_S:
            raise Unauthorized("x-slack-request-timestamp is more than 5 minutes off")
        expected = "v0=" + hmac.new(self._signing.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(headers.get("x-slack-signature", "").encode(), expected.encode()):
            raise Unauthorized("x-slack-signature does not match the body")

    def _event(self, event: dict[str, Any]) -> list[Inbound]:
        if event.get("type") not in ("message", "app_mention") or event.get("subtype") or event.get("bot_id"):
            return []  # edits, joins, bots (this one included) are not messages to answer
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not (isinstance(user, str) and isinstance(channel, str) and isinstance(ts, str)) or user == self.bot_user:
            return []
        text = str(event.get("text") or "")
        if self.bot_user:
            text = text.replace(f"<@{self.bot_user}>", "").strip()
        thread = event.get("thread_ts")
        return [Inbound(key=f"{channel}:{ts}", chat_id=channel, user_id=user, text=text, message_id=ts,
                        thread_id=str(thread) if thread else None, is_dm=event.get("channel_type") == "im")]

    def _actions(self, payload: dict[str, Any]) -> list[Inbound]:
        if payload.get("type") != "block_actions":
            return []
        user = (payload.get("user") or {}).get("id")
        channel = (payload.get("channel") or {}).get("id") or (payload.get("container") or {}).get("channel_id")
        message = (payload.get("message") or {}).get("ts") or (payload.get("container") or {}).get("message_ts")
        found = []
        for action in payload.get("actions") or []:
            value, stamp = action.get("value"), action.get("action_ts")
            if isinstance(value, str) and user and channel:
                found.append(Inbound(key=f"act:{channel}:{message}:{stamp}", chat_id=str(channel), user_id=str(user),
                                     message_id=str(message) if message else None, button=value))
        return found

    # --- out -------------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        if delivery.kind == "answer":
            return None  # Slack needs no acknowledgement of a press beyond the envelope's (or the 200)
        params: dict[str, Any] = {"channel": delivery.chat_id, "text": delivery.text}
        buttons = delivery.buttons
        if buttons or (delivery.kind == "edit" and ":ap:" in (delivery.target or "")):
            params["blocks"] = _blocks(delivery.text, buttons)  # an approval: its buttons, or (decided) none
        if delivery.kind == "edit":
            params["ts"] = target_id
            await self.call("chat.update", params)
            return target_id
        if delivery.thread_id is not None:
            params["thread_ts"] = delivery.thread_id
        sent = await self.call("chat.postMessage", params)
        return str(sent["ts"]) if sent.get("ts") else None

    async def typing(self, chat_id: str, thread_id: str | None) -> None:
        return None  # a bot has no typing indicator in Slack

    async def aclose(self) -> None:
        await self._http.aclose()


def _blocks(text: str, buttons: list[tuple[str, str]]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}]
    if buttons:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": label}, "action_id": f"corral_{index}",
             "value": data, **({"style": "primary"} if index == 0 else {})}
            for index, (label, data) in enumerate(buttons)]})
    return blocks


def _seconds(raw: str | None, default: float = 1.0) -> float:
    try:
        return max(0.0, float(raw)) if raw is not None else default
    except ValueError:
        return default
