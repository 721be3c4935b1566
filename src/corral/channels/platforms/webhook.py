"""The generic webhook channel: messages come in signed at ``POST /v1/channels/{name}/inbound``,
replies go out signed to the channel's ``callback_url``.

Both directions carry ``x-corral-timestamp`` (Unix seconds) and ``x-corral-signature:
sha256=HEX(HMAC_SHA256(secret, timestamp + "." + body))``; a request whose timestamp is more
than 5 minutes off is refused, so a captured request cannot be replayed later. In:
``{chat_id, user_id, message_id, text}`` (or ``button`` instead of ``text``: the data of a
pressed button; optional ``thread_id`` and ``group``). Out: ``{chat_id, in_reply_to, text,
final}`` plus ``reply_id`` (the same for every version of one message: a later POST with the
same ``reply_id`` replaces the text, as a chat edit would), ``part`` and ``buttons``
(``[{label, data}]``); each delivery's ``x-corral-idempotency-key`` lets a receiver drop a
repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from corral.channels.config import ChannelSpec
from corral.channels.errors import Rejected, Transient
from corral.channels.platforms.base import Delivery, Inbound, Take, retry_after_header, transport_error
from corral.errors import InvalidInput, Unauthorized

MAX_SKEW_S = 300


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if now is None else now))
    return {"x-corral-timestamp": timestamp, "x-corral-signature": sign(secret, timestamp, body),
            "content-type": "application/json"}


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Refuse (``Unauthorized``) a request without a valid signature or with a stale timestamp."""
    timestamp = headers.get("x-corral-timestamp", "")
    signature = headers.get("x-corral-signature", "")
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        raise Unauthorized("x-corral-timestamp is missing or not a number of seconds") from None
    if age > MAX_SKEW_S:
        raise Unauthorized("x-corral-timestamp is more than 5 minutes off")
    if not hmac.compare_digest(signature.encode(), sign(secret, timestamp, body).encode()):
        raise Unauthorized("x-corral-signature does not match the body")


def _text_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise InvalidInput(f"{name} must be a non-empty string or integer")
    if len(str(value)) > 128:
        raise InvalidInput(f"{name} is longer than 128 characters")
    return str(value)


class Webhook:
    wants_final = True

    def __init__(self, spec: ChannelSpec):
        self.spec = spec
        self._secret = spec.secret("secret_env")
        assert spec.callback_url is not None  # the spec's validator requires it
        self._url = spec.callback_url
        self._http = httpx.AsyncClient(timeout=spec.request_timeout_s)

    def __repr__(self) -> str:
        return f"<Webhook {self.spec.name}>"

    async def start(self) -> None:
        return None

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        await asyncio.Event().wait()  # pushed to: nothing to pull

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        verify(self._secret, headers, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("the body must be a JSON object")
        chat_id, user_id, message_id = (_text_field(data, name) for name in ("chat_id", "user_id", "message_id"))
        assert chat_id is not None and user_id is not None and message_id is not None
        text, button = data.get("text"), data.get("button")
        if button is not None:
            if not isinstance(button, str) or not button:
                raise InvalidInput("button must be a non-empty string")
        elif not isinstance(text, str) or not text.strip():
            raise InvalidInput("text must be a non-empty string (or give button)")
        return [Inbound(key=f"{chat_id}:{message_id}", chat_id=chat_id, user_id=user_id, text=text or "",
                        message_id=message_id, thread_id=_text_field(data, "thread_id", required=False),
                        is_dm=not bool(data.get("group")), button=button)]

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        if delivery.kind == "answer":
            return None  # a button press needs no acknowledgement here
        reply_id = delivery.target if delivery.kind == "edit" else delivery.key
        payload: dict[str, Any] = {"chat_id": delivery.chat_id, "in_reply_to": delivery.extra.get("reply_to"),
                                   "text": delivery.text, "final": bool(delivery.extra.get("final")),
                                   "reply_id": reply_id, "part": delivery.extra.get("part", 0)}
        if delivery.thread_id is not None:
            payload["thread_id"] = delivery.thread_id
        if delivery.buttons:
            payload["buttons"] = [{"label": label, "data": data} for label, data in delivery.buttons]
        body = json.dumps(payload).encode()
        headers = {**signed_headers(self._secret, body), "x-corral-idempotency-key": delivery.key}
        try:
            response = await self._http.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._secret) from None
        if response.status_code == 429:
            raise retry_after_header(response)
        if response.status_code >= 500:
            raise Transient(f"the callback answered HTTP {response.status_code}")
        if response.status_code >= 400:
            raise Rejected(f"the callback refused the reply: HTTP {response.status_code}")
        return reply_id

    async def typing(self, chat_id: str, thread_id: str | None) -> None:
        return None

    async def aclose(self) -> None:
        await self._http.aclose()
