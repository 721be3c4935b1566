"""Event streams written straight to the connection, with flow control of their own.

An event stream (``EventStream``) is a tap of the kernel's hub (``corral.kernel.audience``):
committed events are written to its connection as they commit, without waking its task. Its
task only joins (reads the store), waits, and catches up when it fell behind.

Writing outside ASGI's ``send`` needs the connection's transport, which ASGI does not hand
out. Under uvicorn, a request runs in a task whose coroutine is its ``RequestResponseCycle``'s
``run_asgi``, and the cycle holds the transport and the scope: ``connection_transport`` finds
them there and checks that the scope is this request's. Anything else (another server, an
HTTP version other than 1.1, a cycle that looks different) gets ``None``, and the route falls
back to sse-starlette's response over ``send`` (routes/events.py), the same frames through the
same resume rules. ``tests/api/test_streams.py`` checks that the direct path is the one taken
under uvicorn, so an upgrade that moves these attributes fails a test, not a benchmark.

The response head and its end still go through ``send`` (middlewares add their headers,
uvicorn keeps the connection's state); between them, body chunks are HTTP/1.1 chunked frames
written to the transport, which is what uvicorn would write for them. A run's last events are
kept back and sent as the end's body: uvicorn writes them and the chunked terminator at once, so
a client reads the end of a run's stream in one segment and wakes once.

Flow control: the transport pauses at the tap's cap (``set_write_buffer_limits``), and the
socket's unsent queue is kept small (``TCP_NOTSENT_LOWAT``), so a reader that stops reading
makes its transport's buffer grow within a few dozen KB instead of filling megabytes of kernel
buffers first. Past the cap its tap falls behind and costs nothing per event; its task waits
for the connection to drain (``send`` of an empty chunk waits while uvicorn's writes are
paused) and catches up from the store.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from corral.kernel import Kernel
from corral.kernel.audience import Tap, TapState
from corral.kernel.observers import PAGE, Drained
from corral.store import repo
from corral.types import CancelMode

log = logging.getLogger(__name__)

PING_S = 15.0
PING = b": ping\r\n\r\n"
# The kernel may keep this much of a stream's bytes unsent (TCP_NOTSENT_LOWAT); the rest waits
# in the transport, where its tap's cap sees it.
UNSENT_LOWAT = 16 * 1024
CORK: int | None = getattr(socket, "TCP_CORK", None)


def connection_transport(scope: Scope) -> asyncio.Transport | None:
    """The transport of the HTTP/1.1 connection serving ``scope``, when this task is uvicorn's
    task for it; None otherwise. Call it from the request's own task (a route or its response)."""
    if scope.get("type") != "http" or scope.get("http_version") != "1.1" or scope.get("method") == "HEAD":
        return None
    task = asyncio.current_task()
    frame = getattr(task.get_coro() if task is not None else None, "cr_frame", None)
    cycle = frame.f_locals.get("self") if frame is not None else None
    transport = getattr(cycle, "transport", None)
    if getattr(cycle, "scope", None) is not scope or not isinstance(transport, asyncio.Transport):
        return None
    return None if transport.is_closing() else transport


class TransportSink:
    """A tap's writes as HTTP/1.1 chunks on the transport (``corral.kernel.audience.Sink``)."""

    def __init__(self, transport: asyncio.Transport, cap: int):
        self.transport = transport
        transport.set_write_buffer_limits(high=cap, low=cap // 4)
        sock = transport.get_extra_info("socket")
        self._tcp = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None
        self._held = False
        self.last = b""  # the stream's final bytes, kept back to go with the response's end
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if self._tcp is not None and lowat is not None:
            try:
                self._tcp.setsockopt(socket.IPPROTO_TCP, lowat, UNSENT_LOWAT)
            except OSError as exc:  # the transport's cap still holds; only the kernel keeps more
                log.debug("TCP_NOTSENT_LOWAT not set: %s", exc)

    def __repr__(self) -> str:
        return f"<TransportSink backlog={self.backlog()} closing={self.transport.is_closing()}>"

    def backlog(self) -> int:
        return self.transport.get_write_buffer_size()

    def write(self, data: bytes, *, final: bool = False) -> bool:
        if self.transport.is_closing():
            return False
        if final:  # the run's last events: the response's end carries them (EventStream._respond)
            self.last = data
        else:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def hold(self) -> None:
        """Keep what is written from here on in the kernel until ``release`` (TCP_CORK), so that
        a response's head leaves with its first events as one segment and the reader wakes once
        instead of twice. (Linux sends what is held after 200 ms whatever happens.)"""
        if self._tcp is None or self._held or CORK is None:
            return
        try:
            self._tcp.setsockopt(socket.IPPROTO_TCP, CORK, 1)
            self._held = True
        except OSError as exc:
            log.debug("TCP_CORK not set: %s", exc)

    def release(self) -> None:
        if not self._held or self._tcp is None or CORK is None:
            return
        self._held = False
        try:
            self._tcp.setsockopt(socket.IPPROTO_TCP, CORK, 0)
        except OSError as exc:  # the connection is gone: nothing is waiting for what was held
            log.debug("TCP_CORK not cleared: %s", exc)


class EventStream(Response):
    """Server-Sent Events of a session, or of one of its runs (``run_id``), from ``after`` on.

    ``ended``: the run has ended, so its stream is a replay that ends even when resumed past the
    terminal event. A stream answering a ``POST`` opens its tap before the run exists (``open``),
    and once it knows the run (``follow``) none of a new run's events needs a store read. Ends
    after a run's terminal event, on disconnect, or when the kernel stops.
    """

    media_type = "text/event-stream"

    def __init__(self, kernel: Kernel, transport: asyncio.Transport, session_id: str, *, after: int = 0,
                 run_id: str | None = None, ended: bool = False, cancel_on_disconnect: bool = False,
                 headers: Mapping[str, str] | None = None):
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-store", "connection": "keep-alive", "x-accel-buffering": "no",
                           **(headers or {})})
        self.kernel = kernel
        self.sink = TransportSink(transport, kernel.hub.tap_cap)
        self.session_id, self.run_id, self.after, self.ended = session_id, run_id, after, ended
        self.cancel_on_disconnect = cancel_on_disconnect
        self.tap: Tap | None = None
        self.read_first = True
        self.gone = asyncio.Event()

    def __repr__(self) -> str:
        return f"<EventStream {self.session_id}{'/' + self.run_id if self.run_id else ''} {self.tap!r}>"

    def open(self) -> None:
        """Join the session's audience now: whatever it publishes from here on is kept for this
        stream. The caller must ``follow`` or ``close`` next."""
        self.tap = self.kernel.hub.tap(self.session_id, self.sink, run_id=self.run_id, after=self.after)

    def follow(self, run_id: str, *, new_run: bool, headers: Mapping[str, str]) -> None:
        """Stream ``run_id``'s events (after ``after``). ``new_run``: it was created after ``open``,
        so every event of it comes through the hub and the store need not be read first."""
        assert self.tap is not None
        self.run_id = self.tap.run_id = run_id
        self.read_first = not new_run
        # Appended as they are (lower-case names, none of them already set): MutableHeaders'
        # update searches the list once per header, on every turn of a one-request client.
        self.raw_headers.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())

    def close(self) -> None:
        if self.tap is not None:
            self.kernel.hub.remove(self.tap)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.read_first:  # the head leaves with the backlog's first events (released once written)
            self.sink.hold()  # (a new run's stream has no backlog: its head goes at once)
        try:
            await self._respond(receive, send)
        finally:
            self.sink.release()

    async def _respond(self, receive: Receive, send: Send) -> None:
        finished = False
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

            async def drained() -> bool:
                return await self._drained(send)

            finished = await (self._replay(drained) if self.ended else self._follow(drained))
        finally:
            watcher.cancel()
            self.close()
            if self.cancel_on_disconnect and not finished and self.run_id is not None:
                self.kernel.cancel_soon(self.run_id, CancelMode.SOFT)
        if self.gone.is_set():
            return
        if self.kernel.stopping.is_set() and self.sink.backlog():
            # A client that stopped reading would hold the shutdown until it reads: drop it (it
            # resumes from its Last-Event-ID elsewhere or later).
            self.sink.transport.abort()
        # The run's last events end the response: a client that stops reading at the terminal
        # event has the whole response, so its connection is reused instead of closed.
        await send({"type": "http.response.body", "body": self.sink.last, "more_body": False})

    async def _drained(self, send: Send) -> bool:
        """Until the connection took most of what it holds (uvicorn's ``send`` waits while the
        transport's writes are paused, and an empty chunk writes nothing); False if the client
        left or the kernel stops first."""
        if not self.sink.backlog():
            return not self._over()
        self.sink.release()  # what is held must go before the connection can drain
        waiting = {asyncio.ensure_future(send({"type": "http.response.body", "body": b"", "more_body": True})),
                   asyncio.ensure_future(self.gone.wait()), asyncio.ensure_future(self.kernel.stopping.wait())}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiting:
                waiter.cancel()
        return not self._over()

    async def _watch(self, receive: Receive) -> None:
        """Until the client goes away (the request's body was read before the stream began)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()
        if self.tap is not None:
            self.tap.wake()

    def _over(self) -> bool:
        return self.gone.is_set() or self.kernel.stopping.is_set()

    async def _follow(self, drained: Drained) -> bool:
        """The backlog, then live; True once a run's terminal event was written."""
        hub = self.kernel.hub
        if self.tap is None:
            self.open()
        assert self.tap is not None
        tap, read = self.tap, self.read_first
        while not self._over():
            if await hub.catch_up(self.kernel.store, tap, drained, read=read):
                return True  # the run's last events, and a head still held, leave with the end
            self.sink.release()
            read = True
            while tap.state is TapState.LIVE and not self._over():
                tap.wakeup.clear()
                try:
                    async with asyncio.timeout(PING_S):
                        await tap.wakeup.wait()
                except TimeoutError:
                    if self.sink.backlog() <= tap.cap:
                        self.sink.write(PING)
            if tap.state is TapState.FINISHED:
                return True
            if tap.state is TapState.CLOSED:
                return False
        return False

    async def _replay(self, drained: Drained) -> bool:
        """An ended run's stored events after ``after``; ends even when that is past its end."""
        assert self.run_id is not None
        after = self.after
        while not self._over():
            page = await self.kernel.store.read(repo.events_after, self.session_id, after, run_id=self.run_id,
                                                limit=PAGE)
            ends = len(page) < PAGE
            if page:
                after = page[-1].seq
                if not self.sink.write(b"".join(event.sse_frame() for event in page), final=ends):
                    return False
            if ends:
                return True
            self.sink.release()
            await drained()
        return False
