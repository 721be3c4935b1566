"""A kernel in its own task, the sessions and agents tests use, and reading back what it did."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.kernel import Kernel, KernelConfig
from corral.kernel.agents import AgentRuntime
from corral.settings import default_agent
from corral.specs import AgentPolicy, AgentSpec
from corral.store import Event, Store, repo
from corral.tools import ToolRegistry
from corral.types import Approval, Disposition, RunStatus

TERMINAL = {s.value for s in RunStatus if s.is_terminal}
POLL_S = 0.02
# An agent that asks a human before every `wait` call: a run of its parks in `waiting` until the
# test decides, which keeps a session busy for exactly as long as a test needs, without timing.
GATED = AgentSpec(name="gated", policy=AgentPolicy(approvals={"wait": Approval.ASK}))
PARK = '/tool wait {"ms": 1}'


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
    row = await kernel.store.read(repo.get_run, run_id)
    assert row is not None, f"no run {run_id}"
    return dict(row._mapping)


async def new_session(kernel: Kernel, agent: str = "assistant", key: str | None = None) -> str:
    row, _ = await kernel.sessions.create(agent, key, {})
    return str(row["id"])


async def ready_agent(kernel: Kernel, spec: AgentSpec) -> AgentRuntime:
    """Create the agent and wait until it is ready."""
    await kernel.agents.create(spec)
    return await kernel.agents.wait_ready(spec.name)


async def agent_session(kernel: Kernel, spec: AgentSpec) -> str:
    """A new session of ``spec``'s agent, created first unless it exists, once it is ready."""
    if not kernel.agents.exists(spec.name):
        await kernel.agents.create(spec)
    await kernel.agents.wait_ready(spec.name)
    return await new_session(kernel, spec.name)


async def park(kernel: Kernel, session: str) -> tuple[str, str]:
    """Start a run of a ``GATED`` session that waits for an approval; returns (run id, call id)."""
    accepted = await kernel.submit(session, PARK)
    assert accepted.disposition is Disposition.STARTED
    requested = await wait_event(kernel, session, "approval.requested", run_id=accepted.run_id)
    await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id)
    return accepted.run_id, requested.data["call_id"]


async def stored_events(store: Store, session_id: str) -> list[Event]:
    """Every committed event of the session, read straight from the store."""
    return await store.read(repo.events_after, session_id, 0, limit=1_000_000)


async def session_events(kernel: Kernel, session_id: str) -> list[Event]:
    """Every committed event of the session, read straight from the kernel's store."""
    return await stored_events(kernel.store, session_id)


def first_event(events: list[Event], type_: str, run_id: str) -> Event:
    """The first event of ``type_`` that ``run_id`` has in ``events``."""
    return next(e for e in events if e.type == type_ and e.run_id == run_id)


def seq_of(events: list[Event], type_: str, run_id: str) -> int:
    return first_event(events, type_, run_id).seq
