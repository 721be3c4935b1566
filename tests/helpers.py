"""Test harnesses: a kernel in its own task, a real HTTP server on loopback, waiting on events."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from corral.api import create_app
from corral.kernel import Kernel, KernelConfig
from corral.settings import Settings, default_agent
from corral.specs import AgentSpec
from corral.store import Event, Store
from corral.tools import ToolRegistry
from corral.types import RunStatus

TERMINAL = {s.value for s in RunStatus if s.is_terminal}
POLL_S = 0.02


class KernelHarness:
    """Runs ``kernel.running()`` in a task of its own, so tests can start and stop it at will."""

    def __init__(self, url: str, config: KernelConfig | None = None, agents: tuple[AgentSpec, ...] | None = None,
                 tools: ToolRegistry | None = None):
        self.url = url
        self.config = config or KernelConfig()
        self.agents = agents if agents is not None else (default_agent(),)
        self.tools = tools
        self.kernel: Kernel | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

    async def start(self) -> Kernel:
        self._stop.clear()
        self._ready.clear()
        self.kernel = Kernel(Store(self.url), self.config, initial_agents=self.agents, tools=self.tools)
        self._task = asyncio.create_task(self._main(self.kernel))
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            await self._task  # raises the start-up error
        for spec in self.agents:
            await self.kernel.agents.wait_ready(spec.name)
        return self.kernel

    async def _main(self, kernel: Kernel) -> None:
        async with kernel.running():
            self._ready.set()
            await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None


async def until(predicate: Callable[[], object]) -> None:
    """Poll a condition of the outside world (a file, a process) that sends no event; the
    caller's ``asyncio.timeout`` bounds the wait."""
    while not predicate():  # noqa: ASYNC110 - nothing to wait on but the condition itself
        await asyncio.sleep(POLL_S)


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'corral.db'}"


async def run_events(kernel: Kernel, run_id: str, after: int = 0) -> list[Event]:
    """Every event of a run, waiting until its terminal event (synchronises on events, not time)."""
    run = await get_run(kernel, run_id)
    events = []
    async for event in kernel.hub.observe(kernel.store, run["session_id"], after=after, run_id=run_id):
        events.append(event)
    return events


async def wait_run(kernel: Kernel, run_id: str) -> dict[str, Any]:
    """The run's row once it has ended."""
    await run_events(kernel, run_id)
    return await get_run(kernel, run_id)


async def wait_event(kernel: Kernel, session_id: str, type_: str, *, after: int = 0,
                     run_id: str | None = None) -> Event:
    async for event in kernel.hub.observe(kernel.store, session_id, after=after):
        if event.type == type_ and (run_id is None or event.run_id == run_id):
            return event
    raise AssertionError("observer ended")


async def select_all(store: Store, query: Any) -> list[Any]:
    """The rows of a Core query, read in one hand-off."""
    return list(await store.read(lambda conn: conn.execute(query).all()))


async def select_scalar(store: Store, query: Any) -> Any:
    return await store.read(lambda conn: conn.execute(query).scalar())


async def get_run(kernel: Kernel, run_id: str) -> dict[str, Any]:
    from corral.store import repo

    row = await kernel.store.read(repo.get_run, run_id)
    assert row is not None, f"no run {run_id}"
    return dict(row._mapping)


async def new_session(kernel: Kernel, agent: str = "assistant", key: str | None = None) -> str:
    row, _ = await kernel.sessions.create(agent, key, {})
    return str(row["id"])


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
