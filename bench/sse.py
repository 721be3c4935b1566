"""A minimal SSE reader over aiohttp (the load generator must not be the bottleneck).

It reads whatever bytes have arrived and splits whole frames out of them, instead of awaiting
the stream line by line: an event is four lines (`id:`, `event:`, `data:`, blank), and each
awaited line is a trip through aiohttp's reader, which made the SSE side most of the client's
CPU per turn. On a 2-core machine every cycle the generator saves is left to the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def sse_frames(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str, str]]:
    """(id, event, data) of each frame; comment-only frames (pings) are skipped."""
    buffer = b""
    async for chunk in response.content.iter_any():
        # CRLF pairs split across chunks meet again here, since a frame's end stays buffered.
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        *frames, buffer = buffer.split(b"\n\n")
        for frame in frames:
            ident = event = ""
            data: list[str] = []
            for line in frame.decode().split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    data.append(value)
                elif field == "id":
                    ident = value
                elif field == "event":
                    event = value
            if data:
                yield ident, event, "\n".join(data)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Each event's `data:` as JSON (Corral's events carry their seq, type and run_id in it)."""
    async for _, _, data in sse_frames(response):
        yield json.loads(data)
