"""A real server on loopback, an HTTP client, and what tests do with them: Server-Sent Events
parsed by the WHATWG rules, and the REST calls most tests make, each checking its status."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import uvicorn

from corral.api import create_app
from corral.kernel import Kernel
from corral.settings import Settings
from corral.store import Store
from tests.helpers.kernel import TERMINAL

TERMINAL_EVENTS = {f"run.{status}" for status in TERMINAL}


# --- servers and clients ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def uvicorn_server(
    settings: Settings, store: Store | None = None
) -> AsyncIterator[tuple[str, Kernel, uvicorn.Server]]:
    """A real uvicorn server on a loopback port, in this event loop; yields (base URL, kernel, server)."""
    app = create_app(settings, store=store)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise AssertionError("server exited during start-up")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.kernel, server
    finally:
        app.state.kernel.begin_stop()
        server.should_exit = True
        await task


@asynccontextmanager
async def http_server(settings: Settings) -> AsyncIterator[tuple[str, Kernel]]:
    """A real uvicorn server on a loopback port, in this event loop; yields (base URL, kernel)."""
    async with uvicorn_server(settings) as (base, kernel, _server):
        yield base, kernel


def client(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30.0), **kwargs)


# --- Server-Sent Events ----------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One dispatched SSE event: ``id:``, ``event:`` and the joined ``data:`` lines."""

    id: str | None
    event: str
    data: str

    @property
    def seq(self) -> int:
        assert self.id is not None, f"frame without id: {self}"
        return int(self.id)

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        assert isinstance(value, dict)
        return value


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[Frame]:
    """Parse ``text/event-stream`` lines per the WHATWG rules (comments, field names, one optional space)."""
    event_id: str | None = None
    event_type = ""
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield Frame(event_id, event_type or "message", "\n".join(data))
            event_type, data = "", []  # the id persists, as the spec's "last event ID buffer"
            continue
        if line.startswith(":"):
            continue  # a comment (sse-starlette's keep-alive ping)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "id":
            event_id = value
        elif name == "event":
            event_type = value
        elif name == "data":
            data.append(value)


async def sse_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    assert response.status_code == 200, response.status_code
    assert response.headers["content-type"].startswith("text/event-stream")
    async for frame in parse_sse(response.aiter_lines()):
        yield frame


async def raw_sse_lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """The lines of an SSE response read off a raw socket (HTTP/1.1, chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
    assert head.startswith("http/1.1 200"), head
    assert "transfer-encoding: chunked" in head, head
    pending = ""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            return
        pending += (await reader.readexactly(size + 2))[:-2].decode()
        *lines, pending = pending.split("\r\n")
        for line in lines:
            yield line


def check_frame(frame: Frame) -> None:
    """The envelope every frame carries: ``id`` = seq, ``event`` = type, data with the envelope fields."""
    body = frame.json
    assert body["seq"] == frame.seq
    assert body["type"] == frame.event
    assert {"run_id", "session_id", "ts"} <= body.keys()
    assert datetime.fromisoformat(body["ts"]).utcoffset() is not None


async def read_run(http: httpx.AsyncClient, run_id: str, **kwargs: Any) -> list[Frame]:
    """Every frame of a run stream; the stream ends on its own after the terminal event."""
    async with http.stream("GET", f"/v1/runs/{run_id}/events", **kwargs) as response:
        return [frame async for frame in sse_frames(response)]


async def read_session_until(
    http: httpx.AsyncClient, session_id: str, last_seq: int, **kwargs: Any
) -> list[Frame]:
    """A session stream (which never ends by itself) read up to and including ``last_seq``."""
    frames: list[Frame] = []
    async with http.stream("GET", f"/v1/sessions/{session_id}/events", **kwargs) as response:
        async for frame in sse_frames(response):
            frames.append(frame)
            if frame.seq >= last_seq:
                break
    return frames


def assert_contiguous(frames: list[Frame], first: int) -> None:
    assert [f.seq for f in frames] == list(range(first, first + len(frames)))


async def until_event(frames: AsyncIterator[Frame], *types: str, run_id: str | None = None) -> Frame:
    """The next frame of one of ``types`` (and of ``run_id``, if given)."""
    async for frame in frames:
        if frame.event in types and (run_id is None or frame.json["run_id"] == run_id):
            return frame
    raise AssertionError(f"stream ended before any of {types}")


# --- the REST calls tests make ------------------------------------------------------------


async def new_http_session(http: httpx.AsyncClient, agent: str = "assistant") -> str:
    response = await http.post("/v1/sessions", json={"agent": agent})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def post(http: httpx.AsyncClient, session_id: str, content: str, **extra: Any) -> dict[str, Any]:
    response = await http.post(f"/v1/sessions/{session_id}/messages", json={"content": content, **extra})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def create_agent(http: httpx.AsyncClient, name: str, **spec: Any) -> None:
    response = await http.post("/v1/agents", json={"name": name, "provider": "demo", **spec})
    assert response.status_code == 201, response.text


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an error of ``status`` (and ``code``) in Corral's error envelope; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"], error  # README: {code, message, type} always
    if code is not None:
        assert error["code"] == code, error
    return dict(error)
