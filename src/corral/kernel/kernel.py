"""The kernel: accepts inputs, orders them per session, runs them, and records outcomes.

This module is the thin front the rest of Corral talks to, and the owner of the
state the kernel's parts share (live runs, sessions, agents). Each question a reader
may ask has its own module:

- how does a message get in? ``intake``
- how does a run go (begin, park, resume)? ``drive``
- how does a run end, and what if its write fails? ``ending`` and ``repair``
- who stops what? ``control``
- who owns the tasks? ``supervision``
- should this node get traffic, and what did a start on a store refusing writes leave for later? ``readiness``

Every decision about run state is a synchronous method (atomic on the event loop);
the I/O it implies goes to the store afterwards. Nothing holds a lock across an await.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from corral.errors import Conflict, OwnedElsewhere, StoreUnavailable
from corral.events import Event
from corral.kernel.agents import AgentManager
from corral.kernel.client_tools import Answered, ClientTools
from corral.kernel.config import KernelConfig
from corral.kernel.control import Control
from corral.kernel.conversations import Conversations
from corral.kernel.drive import Driver
from corral.kernel.ending import Ending
from corral.kernel.intake import Intake
from corral.kernel.observers import EventHub
from corral.kernel.ports import Backends, Ownership, RemoteSubmit
from corral.kernel.readiness import Readiness
from corral.kernel.recovery import recover, recover_session
from corral.kernel.runs import CancelReason, RunEnd, RunHandle
from corral.kernel.sessions import Accepted, SessionRuntime, SessionTable
from corral.kernel.supervision import Supervisor, wait_all
from corral.metrics import Metrics
from corral.types import ApprovalStatus, CancelMode, Decision, ExecPolicy, Mode, RunStatus

if TYPE_CHECKING:
    from corral.providers.base import ModelOptions, ToolCall
    from corral.specs import AgentSpec
    from corral.store import Store
    from corral.tools.base import ToolRegistry

__all__ = ["Kernel", "KernelConfig"]

# How long shutdown waits for run ends still being written (a store that stays down
# leaves them to start-up recovery, as a crash would).
SETTLE_AT_SHUTDOWN_S = 5.0


class Kernel:
    def __init__(
        self,
        store: Store,
        config: KernelConfig | None = None,
        *,
        tools: ToolRegistry | None = None,
        initial_agents: tuple[AgentSpec, ...] = (),
        metrics: Metrics | None = None,
        backends: Backends | None = None,
        ownership: Ownership | None = None,
        remote: RemoteSubmit | None = None,
    ):
        if backends is None or tools is None:
            # The real parts, wired where the kernel's users need not do it themselves; the kernel
            # itself knows them only through ``Backends`` (imported here, on first construction).
            from corral.tools import default_registry
            from corral.wiring import default_backends

            backends = backends or default_backends()
            tools = tools or default_registry()
        self.store = store
        self.config = config or KernelConfig()
        self.backends = backends
        self.hub = EventHub()
        store.on_commit(self.hub.publish)
        self.metrics = metrics or Metrics()
        store.on_commit(self._count_events)
        store.on_batch(self._observe_batch)
        self.metrics.watch(self._state)
        self.conversations = Conversations(store, self.config.conversation_cache_sessions)
        store.on_messages(self.conversations.committed)
        # Where sessions' lanes live: absent on one node (all of them here), a cluster's otherwise.
        self.ownership = ownership
        self.remote = remote
        self.sessions = SessionTable(store, self.config.max_pending_inputs, on_created=self._session_created,
                                     capacity=self.config.live_sessions,
                                     keys_per_session=self.config.idempotency_keys_per_session,
                                     ownership=ownership, on_adopted=self._adopted)
        # Services may add tools (the scheduler's `schedule`) before agents pick theirs.
        self.tools = tools
        self.supervisor = Supervisor()
        self.agents = AgentManager(store, self.tools, self.supervisor.spawn, self.config.workspace_root, backends)
        self.intake, self.driver, self.ending, self.control = Intake(self), Driver(self), Ending(self), Control(self)
        # Runs waiting for the results of their client's own tools (the OpenAI endpoints).
        self.client_tools = ClientTools(self)
        self.run_end_listeners: list[Callable[[RunEnd], None]] = []
        # Told (synchronously) the id of each session this node took over from nobody (a cluster).
        self.adopted_listeners: list[Callable[[str], None]] = []
        self._services: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        # (start, stop) pairs: started once the writer runs, before agents and recovery; stopped
        # after the runs, before the writer closes (a cluster node joins and leaves this way).
        self._lifecycle: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []
        self._service_tasks: list[asyncio.Task[None]] = []
        self.tool_slot = asyncio.Semaphore(self.config.max_tool_processes)
        self.stopping = asyncio.Event()
        self._initial_agents = initial_agents
        # Whether to send this node traffic (``/readyz``), and start-up work the store refused for now.
        self.readiness = Readiness(self)
        # Unfinished runs, queued or active, by id. Only the kernel's parts change it.
        self.runs: dict[str, RunHandle] = {}

    def __repr__(self) -> str:
        active = sum(1 for h in self.runs.values() if h.status.is_active)
        return f"<Kernel runs: {active} active, {len(self.runs) - active} queued; {self.hub!r}>"

    # --- lifetime -----------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Kernel]:
        """Migrate, start the writer, recover, start agents; on exit shut down cleanly.

        A store that refuses writes (a full disk) does not stop the start: what start-up had to
        write is finished in the background once it takes them (``readiness``); reads are served
        meanwhile. Migrating is the exception: a schema that is not at its head cannot be served.
        """
        await self.store.migrate()
        try:
            async with asyncio.TaskGroup() as group:
                self.supervisor.open(group)
                started = asyncio.Event()
                group.create_task(self.store.run_writer(started), name="store-writer")
                await started.wait()
                stops: list[Callable[[], Awaitable[None]]] = []
                try:
                    await self.store.probe()  # readiness knows from the start whether the store takes writes
                    self._service_tasks.append(group.create_task(
                        self.supervisor.supervise("store-watch", self.readiness.watch_store), name="store-watch"))
                    for start, stop in self._lifecycle:
                        await start()
                        stops.append(stop)
                    await self.agents.load()
                    for spec in self._initial_agents:
                        if not self.agents.exists(spec.name):
                            try:
                                await self._create_initial_agent(spec)
                            except StoreUnavailable:
                                self.readiness.retry("agent creation", partial(self._create_initial_agent, spec))
                    if self.ownership is None:
                        await recover(self)  # one node: every session is this node's
                    # (in a cluster, a session is recovered when this node takes it: ``_adopted``)
                    for name, service in self._services:
                        self._service_tasks.append(
                            group.create_task(self.supervisor.supervise(name, service), name=name))
                    yield self
                finally:
                    await self._shutdown()
                    for stop in reversed(stops):
                        await stop()
                    self.supervisor.close()
                    self.store.writer.close()
        finally:
            await self.store.aclose()

    async def _create_initial_agent(self, spec: AgentSpec) -> None:
        if self.agents.exists(spec.name):
            return  # created meanwhile (a deferred creation: by another node of the cluster)
        try:
            await self.agents.create(spec)
        except Conflict:  # another node of the cluster created it just now
            await self.agents.load()

    def on_run_end(self, listener: Callable[[RunEnd], None]) -> None:
        """Call ``listener`` (synchronously: it must only record or enqueue) after each run's end
        commits. A listener that raises is logged; it never affects the run or another listener."""
        self.run_end_listeners.append(listener)

    def add_service(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """Register, before ``running()``, a long-lived task the kernel owns: started after
        recovery, restarted with backoff if it fails, cancelled first at shutdown."""
        self._services.append((name, service))

    def add_lifecycle(self, start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
        """Register, before ``running()``, a part that starts once the writer runs (before agents
        and recovery) and stops after the runs have, while the writer still takes writes."""
        self._lifecycle.append((start, stop))

    def begin_stop(self) -> None:
        """Stop intake and end every observer stream; runs are stopped by ``running()``'s exit."""
        self.stopping.set()
        self.hub.wake_all()

    async def _shutdown(self) -> None:
        self.begin_stop()
        for task in self._service_tasks:
            task.cancel()
        if self._service_tasks:
            await asyncio.wait(self._service_tasks)  # unlike awaiting each, never mistakes their cancel for ours
        await self.readiness.stop()
        moving = [h for h in self.runs.values() if h.task is not None and not h.task.done()]
        for handle in moving:
            handle.cancel_reason = CancelReason.SHUTDOWN
            handle.request_cancel(CancelMode.SOFT)
        await wait_all([h.finished for h in moving], self.config.shutdown_grace_s)
        for handle in moving:
            if not handle.finished.is_set():
                self.control.hard_cancel(handle)
        await wait_all([h.finished for h in moving], 5.0)
        if self.ending.repairing:
            _, late = await asyncio.wait(list(self.ending.repairing), timeout=SETTLE_AT_SHUTDOWN_S)
            for task in late:
                task.cancel()  # left `running` in the store: the next start recovers them
        await self.agents.aclose()

    @property
    def accepting(self) -> bool:
        return not self.stopping.is_set()

    # --- the parts' front ---------------------------------------------------------

    async def submit(self, session_id: str, content: str, *, mode: Mode = Mode.QUEUE,
                     policy: ExecPolicy = ExecPolicy.CONTINUE, debounce_ms: int = 0,
                     idempotency_key: str | None = None, origin: str = "api",
                     model_options: ModelOptions | None = None) -> Accepted:
        """Accept one input durably; returns once it is committed (HTTP 202). ``model_options``:
        what the client's request adds to the new run's model calls (its own tools, tool_choice,
        response_format); a call of one of its tools parks the run until ``answer_client_calls``."""
        return await self.intake.submit(session_id, content, mode=mode, policy=policy, debounce_ms=debounce_ms,
                                        idempotency_key=idempotency_key, origin=origin, model_options=model_options)

    async def answer_client_calls(self, run_id: str, results: Mapping[str, str], *,
                                  model_options: ModelOptions | None = None) -> Answered:
        """Record the client's results of its tool calls (call id -> text) for a run waiting for
        them, and resume it once it waits for nothing else (``ClientTools.answer``)."""
        return await self.client_tools.answer(run_id, results, model_options=model_options)

    async def submit_anywhere(self, session_id: str, content: str, *, mode: Mode = Mode.QUEUE,
                              policy: ExecPolicy = ExecPolicy.CONTINUE, idempotency_key: str | None = None,
                              origin: str = "api") -> Accepted:
        """``submit``, or, for a session another node holds, the same message sent there (a
        service's message: the API forwards a client's own request instead)."""
        try:
            return await self.submit(session_id, content, mode=mode, policy=policy, idempotency_key=idempotency_key,
                                     origin=origin)
        except OwnedElsewhere as elsewhere:
            if self.remote is None:
                raise
            return await self.remote.submit(elsewhere.url, session_id, content, mode=mode, policy=policy,
                                            idempotency_key=idempotency_key)

    async def cancel(self, run_id: str, mode: CancelMode) -> RunStatus:
        """Cancel a run; returns its status at the moment the request took effect."""
        return await self.control.cancel(run_id, mode)

    def cancel_soon(self, run_id: str, mode: CancelMode) -> None:
        """Cancel from a context that cannot await (an observer going away)."""
        self.control.cancel_soon(run_id, mode)

    async def decide(self, run_id: str, call_id: str, decision: Decision) -> None:
        await self.control.decide(run_id, call_id, decision)

    async def wait_in_run(self, run_id: str, reason: dict[str, Any], until: Awaitable[None]) -> None:
        """Park a run in ``waiting`` while ``until`` is pending (a tool waiting on subagents): it
        holds no slot, shows as waiting, and goes back to ``running`` when ``until`` is done.
        A cancel meanwhile ends it from ``waiting``."""
        await self.driver.wait_in_run(run_id, reason, until)

    async def ask_approval(self, run_id: str, call: ToolCall) -> ApprovalStatus | None:
        """Ask a human about ``call`` for a run that stays alive meanwhile (an ACP agent's
        permission request, which the agent process waits on): the run shows as ``waiting``
        with the approval pending, as a parked run would. Returns the decision, or None if
        the run is cancelled or ends first."""
        return await self.driver.ask_approval(run_id, call)

    async def _adopted(self, runtime: SessionRuntime) -> None:
        self.conversations.forget(runtime.id)  # another node wrote to it since this one last did
        await recover_session(self, runtime)
        for listener in self.adopted_listeners:
            listener(runtime.id)

    def register(self, runtime: SessionRuntime, handle: RunHandle) -> None:
        runtime.handles[handle.run_id] = handle
        self.runs[handle.run_id] = handle

    # --- views --------------------------------------------------------------------------

    def run_handle(self, run_id: str) -> RunHandle | None:
        return self.runs.get(run_id)

    def session_view(self, session_id: str) -> dict[str, Any]:
        """What only memory knows about a session: its active run and how much waits behind it."""
        runtime = self.sessions.live(session_id)
        if runtime is None or runtime.lane.active is None:
            queued = runtime.lane.pending_inputs() if runtime is not None else 0
            return {"active_run_id": None, "active_status": None, "queued": queued}
        handle = self.runs.get(runtime.lane.active.run_id)
        return {
            "active_run_id": runtime.lane.active.run_id,
            "active_status": handle.status.value if handle is not None else None,
            "queued": runtime.lane.pending_inputs(),
        }

    def _count_events(self, events: list[Event]) -> None:
        self.metrics.events_appended.inc(len(events))

    def _observe_batch(self, units: int, seconds: float) -> None:
        self.metrics.commit_batch.observe(units)
        self.metrics.commit_latency.observe(seconds)

    def _state(self) -> dict[str, Any]:
        """Current-state gauges for a metrics scrape."""
        handles = list(self.runs.values())
        queued = {"interactive": 0, "background": 0}
        for handle in handles:
            if handle.status is RunStatus.QUEUED:
                queued["background" if handle.background else "interactive"] += len(handle.slot.input_ids)
        return {"active_runs": sum(1 for h in handles if h.status.is_active), "queued_by_class": queued,
                "observers": self.hub.observer_count(), "catch_ups": self.hub.catch_ups,
                "sessions_live": len(self.sessions), "store_writable": self.store.health.writable is not False,
                "ready": not self.readiness.reasons()}

    def _session_created(self, row: dict[str, Any]) -> None:
        data = {key: value for key, value in row.items() if key != "created_at"}
        data["created_at"] = row["created_at"].isoformat()
        data["session_id"] = row["id"]  # like every event, so a feed reader routes notices alike
        self.hub.notify(row["id"], "session.created", {**data, **self.session_view(row["id"])})
