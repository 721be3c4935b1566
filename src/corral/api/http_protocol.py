"""uvicorn's HTTP/1.1 protocol with limits on slow and numerous clients (docs/security.md).

uvicorn waits for a request's headers and body as long as the client likes, and accepts as
many connections as there are file descriptors: a few hundred clients sending a byte a second
(slowloris) hold the server's descriptors indefinitely. ``GuardedHttpProtocol`` adds:

- a header deadline, from a request's first byte (a connection's first request: from the
  connection's opening) to the end of its headers; missed, the connection is closed;
- a body deadline, from the end of the headers to the end of the body; missed, the request
  gets 408 ``request_timeout`` if no response has started, and the connection is closed;
- a cap on open connections: one over it gets 503 ``too_many_connections`` at once, without
  a request reaching the app, and is closed.

Every deadline, uvicorn's keep-alive timeout included, is judged on what the client has sent,
not on what the server has read. When the event loop was not running (SIGSTOP, a VM stall),
``select`` comes back from the interrupted wait with no events if the wait's deadline has
passed meanwhile (CPython's ``epoll.poll`` on EINTR), so asyncio runs the due timers before it
has read what arrived during the pause. uvicorn's keep-alive handler then closed a connection
whose next request sat unread in the socket, and the kernel answered that request with a reset
(issue 18). A deadline that finds unread bytes in the socket therefore waits one more turn of
the loop, in which the bytes are read before due timers run.

The protocol is uvicorn's ``HttpToolsProtocol``: httptools parses in C what h11 parses in
Python, and each request of a turn-following client costs less for it (docs/benchmarks.md).
The parser's callbacks tell where a request is (its head begun, its body owed, complete); the
overrides hook them and the points where the connection's state changes: a connection opening,
data arriving, a response completing. uvicorn 0.30 to 0.55 share these points.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import json
import logging
import math
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.api.errors import error_body

logger = logging.getLogger("corral.http")

# A connection that got its last response is read (and what it sends dropped) until the client
# closes it, for at most this long: closed with unread bytes, the socket would send a reset, and
# a reset can reach the client before it has read the response.
LINGER_S = 2.0
# Seconds a client refused at the connection cap is told to wait (Retry-After).
RETRY_AFTER_S = 1
# Connections refused at the cap are logged at most once per this many seconds.
REPORT_REFUSALS_EVERY_S = 60.0


@dataclass(frozen=True)
class ClientLimits:
    """The limits on clients; ``corral serve`` fills them from the settings of the same names."""

    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int


@dataclass
class Refusals:
    """Connections refused at the cap since the last report, shared by a server's connections."""

    count: int = 0
    reported_at: float = -math.inf

    def add(self, now: float) -> int:
        """Count one; the number to report now (this one included), or 0 when the last report is recent."""
        self.count += 1
        if now - self.reported_at < REPORT_REFUSALS_EVERY_S:
            return 0
        count, self.count, self.reported_at = self.count, 0, now
        return count


class Waiting(enum.Enum):
    """What a connection's deadline is for: the client owes the server a request's headers or its body."""

    HEADERS = "headers"
    BODY = "body"


class Reading(enum.Enum):
    """Where the parser is in the client's requests."""

    BETWEEN = "between requests"
    HEAD = "a request's head"
    BODY = "a request's body"


def guarded_protocol(limits: ClientLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, applying ``limits``."""

    class CorralHttpProtocol(GuardedHttpProtocol):
        pass

    CorralHttpProtocol.limits = limits
    CorralHttpProtocol.refusals = Refusals()
    return CorralHttpProtocol


class GuardedHttpProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection, with header and body deadlines and the connection cap."""

    limits: ClassVar[ClientLimits]
    refusals: ClassVar[Refusals]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]  # uvicorn says int
        self._reading = Reading.BETWEEN
        # Invariant: ``_deadline`` is armed exactly while ``_waiting`` is not None, that is while the
        # client owes a request's headers (no request yet on this connection, or the start of one
        # received) or a request's body (its head parsed, not all of its body); ``_sync_deadline``
        # keeps it so.
        self._waiting: Waiting | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        waiting = self._waiting.value if self._waiting is not None else "nothing"
        return f"<{type(self).__name__} client={self.client} reading {self._reading.value}, waiting for {waiting}>"

    # --- where uvicorn's phases change ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._sync_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = Reading.HEAD

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading = Reading.BODY

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = Reading.BETWEEN

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start on a pipelined request
        self._sync_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        if self._client_is_ahead():  # a request arrived while the loop was not running
            self.timeout_keep_alive_task = self._after_next_read(self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    # --- the deadlines -------------------------------------------------------------------------

    def _sync_deadline(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing():
            waiting = None
        elif self._reading is Reading.BODY:
            waiting = Waiting.BODY
        elif not answering and (self._reading is Reading.HEAD or self.cycle is None):
            waiting = Waiting.HEADERS  # (a request sent behind one being answered waits for it)
        else:
            waiting = None  # a request is being answered, or the connection is idle (keep-alive's)
        if waiting is not self._waiting:
            self._set_deadline(waiting)

    def _set_deadline(self, waiting: Waiting | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting = waiting
        if waiting is Waiting.HEADERS:
            self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._missed)
        elif waiting is Waiting.BODY:
            self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._missed)

    def _missed(self) -> None:
        if self.transport.is_closing():
            self._set_deadline(None)
            return
        if self._client_is_ahead():  # read what the client sent before judging it
            self._deadline = self._after_next_read(self._missed)
            return
        waiting, self._waiting, self._deadline = self._waiting, None, None
        if waiting is Waiting.HEADERS:
            logger.debug("closing %s: no complete request headers within %g s", self.client,
                         self.limits.header_timeout_s)
            self._close()
        elif waiting is Waiting.BODY:
            self._body_timed_out()

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        logger.debug("request body from %s not complete within %g s", self.client, self.limits.body_timeout_s)
        if cycle.response_started:  # too late for a 408
            self._close()
            return
        # The app, still reading the body, sees the client leave; whatever it answers is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self.connections.discard(self)  # this protocol is done with the connection (uvicorn's
        # connection_lost, which would discard it, now goes to the lingering protocol)
        message = f"the request body did not arrive within {self.limits.body_timeout_s:g} s (body_timeout_s)"
        response = error_response(408, "request_timeout", message, "invalid_request_error",
                                  self.server_state.default_headers)
        Lingering.take_over(self.transport, response, self.loop)

    def _close(self) -> None:
        # close() waits for the write buffer to drain, which a stalled client may never let happen.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _client_is_ahead(self) -> bool:
        """Whether bytes the client sent wait unread in the socket (and the loop will read them).

        FIONREAD counts them without a read or a new descriptor, which matters when descriptors
        run out. A socket that no longer answers has nothing to read: the deadline goes ahead.
        """
        sock = self.transport.get_extra_info("socket")
        if sock is None or not self.transport.is_reading():
            return False
        try:
            pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(pending, sys.byteorder) > 0

    def _after_next_read(self, callback: Callable[[], None]) -> asyncio.TimerHandle:
        # A timer due now, not call_soon: each turn of the loop runs the callbacks of the sockets
        # select reports before the timers that are due, but call_soon's before either.
        return self.loop.call_later(0, callback)

    # --- the cap -------------------------------------------------------------------------------

    def _refuse(self, transport: asyncio.Transport) -> None:
        to_report = self.refusals.add(time.monotonic())
        if to_report:
            logger.warning("max_connections (%d) reached: refused %d connection(s) with 503 (CORRAL_MAX_CONNECTIONS)",
                           self.limits.max_connections, to_report)
        message = (f"the server has {self.limits.max_connections} open connections, its limit (max_connections); "
                   f"retry in {RETRY_AFTER_S} s")
        response = error_response(503, "too_many_connections", message, "server_error",
                                  self.server_state.default_headers,
                                  extra=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        Lingering.take_over(transport, response, self.loop)


def error_response(status: int, code: str, message: str, kind: str, default_headers: list[tuple[bytes, bytes]],
                   extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with Corral's error envelope."""
    body = json.dumps(error_body(code, message, type=kind)).encode()
    headers = [*default_headers, (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra or []), (b"connection", b"close")]
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass(eq=False)
class Lingering(asyncio.Protocol):
    """A connection after its last response: what the client still sends is dropped, and the
    connection is closed when the client closes its side, or after ``LINGER_S``."""

    transport: asyncio.Transport
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @classmethod
    def take_over(cls, transport: asyncio.Transport, response: bytes, loop: asyncio.AbstractEventLoop) -> Lingering:
        """Write ``response``, end the server's side, and hold the connection until it closes."""
        lingering = cls(transport)
        transport.set_protocol(lingering)
        transport.write(response)
        if not transport.can_write_eof():  # TLS: no half close
            transport.close()
            return lingering
        transport.write_eof()  # after the response: the client reads it, then end of stream
        transport.resume_reading()  # uvicorn may have paused it; the client's close must be seen
        lingering.timer = loop.call_later(LINGER_S, transport.abort)
        return lingering

    def data_received(self, data: bytes) -> None:
        pass  # the rest of a request that has been answered

    def eof_received(self) -> bool:
        return False  # the client is done too: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
