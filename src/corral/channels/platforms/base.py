"""What every platform client offers a channel: messages in, deliveries out.

A ``Platform`` hears its chats either by pulling (``receive``: Telegram's getUpdates, a
gateway) or by being pushed to (``parse_push``: an HTTP route hands it a request), and
sends what the outbox gives it (``deliver``). Its failures are the classified errors of
``corral.channels.errors``; none of them carries a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx

from corral.channels.errors import RetryAfter, Transient
from corral.clock import utcnow


@dataclass(frozen=True, slots=True)
class Inbound:
    """A chat message or a button press, as every platform reports it."""

    # Unique within the channel for one platform message (a redelivery has the same key).
    key: str
    chat_id: str
    user_id: str
    text: str = ""
    message_id: str | None = None
    thread_id: str | None = None
    is_dm: bool = True
    # A pressed button: its data, and the platform's id of the press (to acknowledge it).
    button: str | None = None
    press_id: str | None = None


@dataclass(eq=False, slots=True)
class Delivery:
    """One outbox row as the sender holds it."""

    key: str
    chat_id: str
    thread_id: str | None
    kind: str  # send | edit | answer
    text: str
    target: str | None = None  # an edit's message: the key of its send
    extra: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    created_at: datetime = field(default_factory=utcnow)
    due: float = 0.0  # the loop time before which it is not tried (a backoff, a retry_after)

    def __repr__(self) -> str:
        return f"<Delivery {self.kind} {self.key} chat={self.chat_id} attempts={self.attempts}>"

    @property
    def interim(self) -> bool:
        """A streaming edit a later one replaces: it may wait while other chats get answers."""
        return bool(self.extra.get("interim"))

    @property
    def buttons(self) -> list[tuple[str, str]]:
        return [(str(label), str(data)) for label, data in self.extra.get("buttons", [])]


Take = Callable[[list[Inbound]], Awaitable[None]]


class Platform(Protocol):
    """A platform's client, for one channel; built with its secrets, closed with ``aclose``."""

    # Whether the receiving end needs a reply's last delivery marked final (a webhook's
    # ``final: true``), even when its text did not change.
    wants_final: bool

    async def start(self) -> None:
        """Check the credentials and set the platform up (a webhook, a gateway session);
        ``AuthRejected`` for a token the platform refuses."""
        ...

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        """Hear the platform until cancelled, handing each batch to ``take`` and acknowledging
        it only once ``take`` returned (so a crash makes the platform deliver it again).
        Transient failures are retried here with backoff, told to ``on_trouble`` (None once
        it works again). A push-only transport just waits."""
        ...

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        """A request the platform pushed to this channel's route, checked and parsed;
        ``Unauthorized`` for a bad signature, ``InvalidInput`` for a body that is not one."""
        ...

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        """Send, edit or acknowledge; the platform's id of a sent message. ``target_id`` is
        the platform's id of an edit's message."""
        ...

    async def typing(self, chat_id: str, thread_id: str | None) -> None:
        """Show that the bot is working (a best effort: failures are the caller's to ignore)."""
        ...

    async def aclose(self) -> None: ...


class _Redact(logging.Filter):
    """Takes the channels' secrets out of log records: httpx logs each request's URL (at INFO,
    which the service keeps quiet, but a test or an embedding application may not), and a
    Telegram token is part of every URL."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, *self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


_REDACT = _Redact()
logging.getLogger("httpx").addFilter(_REDACT)


def hide_in_logs(secret: str) -> None:
    """Never let ``secret`` reach a log line of the HTTP client."""
    if secret:
        _REDACT.secrets.add(secret)


def redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def transport_error(exc: httpx.HTTPError, *secrets: str) -> Transient:
    """A timeout or a connection that failed, without the URL (it may hold a token)."""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    detail = redact(str(exc), *secrets)
    return Transient(f"{kind}: {type(exc).__name__}{': ' + detail if detail else ''}")


def retry_after_header(response: httpx.Response, default: float = 1.0) -> RetryAfter:
    raw = response.headers.get("retry-after")
    try:
        seconds = float(raw) if raw is not None else default
    except ValueError:
        seconds = default
    return RetryAfter(f"HTTP 429 (retry after {seconds:g} s)", max(0.0, seconds))
