"""Loopback fakes of the chat platforms' APIs (the channels' tests and ``python -m bench channels``).

Each fake is an ASGI app served by uvicorn on a free loopback port in the caller's event loop
(``serve``), keeps what a bot did to each chat, counts the platform's rate limits broken, and
can be told to answer 429 with ``retry_after``, 5xx, or hang. Tests wait with its ``wait_for``
(a predicate checked after every call it answers), never on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from starlette.types import ASGIApp


@asynccontextmanager
async def serve(app: ASGIApp, *, port: int = 0, close: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """``app`` on a loopback port (a free one by default), in this event loop; yields its base URL.
    ``close`` is called first at the end (a fake ends its long polls there)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise AssertionError("the fake exited during start-up")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if close is not None:
            close()
        server.should_exit = True
        await task
