"""A scripted model server on loopback: raw HTTP/1.1, so a test decides every byte.

Each request takes the next step of the script: a JSON status reply, a chunked SSE stream
(optionally cut mid-way, or left hanging), or silence. The server records what it was
sent and when each connection went away, so tests can assert on both ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Status:
    """A plain JSON reply, e.g. a 429 with ``Retry-After``."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stream:
    """An SSE reply of ``events`` (each a ``data:`` payload, or ``(event name, payload)``).

    ``cut_after`` drops the connection after that many events, mid-body; ``hang_after``
    sends that many and then waits for the client to go away.
    """

    events: list[Any]
    cut_after: int | None = None
    hang_after: int | None = None
    done: bool = True  # end with ``data: [DONE]`` (the OpenAI convention)


@dataclass(frozen=True)
class Silence:
    """Accept the request and never answer (a hung upstream)."""


Step = Status | Stream | Silence


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    disconnected_at: float | None = None


class Upstream:
    def __init__(self, script: list[Step]):
        self.script = list(script)
        self.requests: list[Seen] = []
        self.first_event_sent = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: several requests may share one connection
                request = await _read_request(reader)
                if request is None:
                    return
                seen = Seen(*request, at=time.monotonic())
                self.requests.append(seen)
                step = self.script.pop(0) if self.script else Status(500, {"error": {"message": "script over"}})
                if not await self._reply(step, seen, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # The test is over and the server closes: a handler task that ends cancelled makes
            # asyncio's stream callback log a spurious error, so end normally instead.
            return
        finally:
            with suppress(ConnectionError):
                writer.close()

    async def _reply(self, step: Step, seen: Seen, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Send one reply; False when the connection must end afterwards."""
        if isinstance(step, Status):
            body = json.dumps(step.body).encode()
            head = {"content-type": "application/json", "content-length": str(len(body)), **step.headers}
            writer.write(_head(step.status, head) + body)
            await writer.drain()
            return True
        if isinstance(step, Silence):
            await self._until_gone(seen, reader)
            return False
        writer.write(_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))
        for index, event in enumerate(step.events):
            if step.cut_after is not None and index == step.cut_after:
                writer.transport.abort()  # mid-body: the client cannot mistake this for an end
                return False
            if step.hang_after is not None and index == step.hang_after:
                await writer.drain()
                await self._until_gone(seen, reader)
                return False
            writer.write(_chunk(_sse(event)))
            await writer.drain()
            self.first_event_sent.set()
        if step.done:
            writer.write(_chunk(b"data: [DONE]\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _until_gone(self, seen: Seen, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass
        seen.disconnected_at = time.monotonic()
        self.disconnected.set()


@asynccontextmanager
async def upstream(*script: Step) -> AsyncIterator[Upstream]:
    server_state = Upstream(list(script))
    server = await asyncio.start_server(server_state._handle, "127.0.0.1", 0)
    server_state.port = server.sockets[0].getsockname()[1]
    try:
        yield server_state
    finally:
        server.close()
        with suppress(Exception):
            server.close_clients()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[dict[str, Any], dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return (json.loads(body) if body else {}), headers


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} Scripted"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _sse(event: Any) -> bytes:
    if isinstance(event, tuple):
        name, payload = event
        return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()
    return f"data: {json.dumps(event)}\n\n".encode()


# --- OpenAI chat-completions chunks ------------------------------------------------------

def text_chunks(*pieces: str, usage: tuple[int, int] | None = (7, 3)) -> list[dict[str, Any]]:
    chunks = [_oa_chunk({"role": "assistant", "content": ""})]
    chunks += [_oa_chunk({"content": piece}) for piece in pieces]
    chunks.append(_oa_chunk({}, finish="stop"))
    if usage is not None:
        chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                       "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                 "total_tokens": sum(usage)}})
    return chunks


def tool_call_chunks(call_id: str, name: str, arguments: str, *, split: int = 3,
                     usage: tuple[int, int] = (7, 3)) -> list[dict[str, Any]]:
    """A tool call whose JSON arguments arrive in ``split`` fragments, as real servers send them."""
    size = max(1, len(arguments) // split)
    fragments = [arguments[i:i + size] for i in range(0, len(arguments), size)]
    chunks = [_oa_chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]})]
    chunks += [_oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments]
    chunks.append(_oa_chunk({}, finish="tool_calls"))
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}})
    return chunks


def _oa_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
