"""The kernel: accepts inputs, orders them per session, runs them, and records outcomes.

Every decision about run state is a synchronous method (atomic on the event loop);
the I/O it implies is submitted to the store's single writer afterwards. Nothing
holds a lock across an await. The kernel owns one task group; every run, agent
start and the writer live in it, so stopping the kernel stops them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from corral import logs, tracing
from corral.clock import utcnow
from corral.drivers.acp_turn import AcpTurn
from corral.errors import Conflict, CorralError, NotFound, SessionBusy, ShuttingDown, TooManyPending
from corral.kernel.agents import AgentManager, AgentRuntime
from corral.kernel.config import KernelConfig
from corral.kernel.conversations import Conversations
from corral.kernel.lane import Acceptance, Slot
from corral.kernel.observers import EventHub
from corral.kernel.runs import CancelReason, RunEnd, RunHandle, queued_run_row
from corral.kernel.sessions import Accepted, SessionRuntime, SessionTable
from corral.loop.messages import message_row
from corral.loop.runner import Finished, Parked, SteerInput, StepLoop, Stopped
from corral.metrics import Metrics
from corral.providers.base import ToolCall
from corral.specs import AgentSpec
from corral.store import NewEvent, Store, ops, repo
from corral.store import tables as t
from corral.tools import ToolRegistry, default_registry
from corral.types import (
    TERMINAL_EVENT,
    ApprovalStatus,
    CancelMode,
    Decision,
    Disposition,
    EventType,
    ExecPolicy,
    InputStatus,
    Mode,
    RunStatus,
    new_id,
)

log = logging.getLogger(__name__)


# Inputs from these origins run in the background class (see kernel/slots.py).
BACKGROUND_ORIGINS = frozenset({"scheduler"})
SERVICE_RESTART_MIN_S = 0.1
SERVICE_RESTART_MAX_S = 30.0


class Kernel:
    def __init__(
        self,
        store: Store,
        config: KernelConfig | None = None,
        *,
        tools: ToolRegistry | None = None,
        initial_agents: tuple[AgentSpec, ...] = (),
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.config = config or KernelConfig()
        self.hub = EventHub()
        store.on_commit(self.hub.publish)
        self.metrics = metrics or Metrics()
        store.on_commit(lambda events: self.metrics.events_appended.inc(len(events)))
        store.on_batch(self._observe_batch)
        self.metrics.watch(self._state)
        self.conversations = Conversations(store, self.config.conversation_cache_sessions)
        self.sessions = SessionTable(store, self.config.max_pending_inputs, on_created=self._session_created)
        # Services may add tools (the scheduler's `schedule`) before agents pick theirs.
        self.tools = tools or default_registry()
        self.agents = AgentManager(store, self.tools, self._spawn, self.config.workspace_root)
        self._services: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._run_end_listeners: list[Callable[[RunEnd], None]] = [
            lambda ended: self.metrics.runs_ended.labels(ended.status.value).inc()]
        self._service_tasks: list[asyncio.Task[None]] = []
        self.tool_slot = asyncio.Semaphore(self.config.max_tool_processes)
        self.stopping = asyncio.Event()
        self._initial_agents = initial_agents
        self._runs: dict[str, RunHandle] = {}
        self._group: asyncio.TaskGroup | None = None

    def __repr__(self) -> str:
        active = sum(1 for h in self._runs.values() if h.status.is_active)
        return f"<Kernel runs: {active} active, {len(self._runs) - active} queued; {self.hub!r}>"

    # --- lifetime -----------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Kernel]:
        """Migrate, start the writer, recover, start agents; on exit shut down cleanly."""
        from corral.kernel.recovery import recover

        await self.store.migrate()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                started = asyncio.Event()
                group.create_task(self.store.run_writer(started), name="store-writer")
                await started.wait()
                try:
                    await self.agents.load()
                    for spec in self._initial_agents:
                        if not self.agents.exists(spec.name):
                            await self.agents.create(spec)
                    await recover(self)
                    for name, service in self._services:
                        self._service_tasks.append(group.create_task(self._supervise(name, service), name=name))
                    yield self
                finally:
                    await self._shutdown()
                    self.store.writer.close()
        finally:
            await self.store.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._group is None:
            coro.close()
            raise ShuttingDown("the kernel is not running")
        return self._group.create_task(coro, name=name)

    def on_run_end(self, listener: Callable[[RunEnd], None]) -> None:
        """Call ``listener`` (synchronously: it must only record or enqueue) after each run's end commits."""
        self._run_end_listeners.append(listener)

    def add_service(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """Register, before ``running()``, a long-lived task the kernel owns: started after
        recovery, restarted with backoff if it fails, cancelled first at shutdown."""
        self._services.append((name, service))

    async def _supervise(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        delay = SERVICE_RESTART_MIN_S
        while True:
            began = asyncio.get_running_loop().time()
            try:
                await service()
                return
            except Exception:
                log.exception("service %s failed; restarting in %.1f s", name, delay)
            if asyncio.get_running_loop().time() - began > SERVICE_RESTART_MAX_S:
                delay = SERVICE_RESTART_MIN_S  # it had been healthy for a while: start the backoff afresh
            await asyncio.sleep(delay)
            delay = min(delay * 2, SERVICE_RESTART_MAX_S)

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
        moving = [h for h in self._runs.values() if h.task is not None and not h.task.done()]
        for handle in moving:
            handle.cancel_reason = CancelReason.SHUTDOWN
            handle.request_cancel(CancelMode.SOFT)
        await _wait_finished(moving, self.config.shutdown_grace_s)
        for handle in moving:
            if not handle.finished.is_set():
                self._hard_cancel(handle)
        await _wait_finished(moving, 5.0)
        await self.agents.aclose()

    @property
    def accepting(self) -> bool:
        return not self.stopping.is_set()

    # --- intake ---------------------------------------------------------------------

    async def submit(
        self,
        session_id: str,
        content: str,
        *,
        mode: Mode = Mode.QUEUE,
        policy: ExecPolicy = ExecPolicy.CONTINUE,
        debounce_ms: int = 0,
        idempotency_key: str | None = None,
        origin: str = "api",
    ) -> Accepted:
        """Accept one input durably; returns once it is committed (HTTP 202)."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and takes no new messages")
        runtime = await self.sessions.get(session_id)
        if idempotency_key is not None:
            seen = await self._seen_key(runtime, idempotency_key)
            if seen is not None:
                return seen
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and takes no new messages")
        # --- synchronous: decide, record in memory, submit the write -----------------
        input_id, fresh_run = new_id("in"), new_id("run")
        loop = asyncio.get_running_loop()
        try:
            acceptance = runtime.lane.accept(
                input_id, mode, fresh_run, policy=policy, debounce_ms=debounce_ms, now=loop.time()
            )
        except (SessionBusy, TooManyPending) as exc:
            self.metrics.inputs_rejected.labels(exc.code).inc()
            raise
        runtime.last_input_seq += 1
        runtime.contents[input_id] = content
        accepted = Accepted(session_id, input_id, acceptance.slot.run_id, acceptance.disposition)
        if idempotency_key is not None:
            runtime.idempotency[idempotency_key] = Accepted(**{**accepted.__dict__, "duplicate": True})
        unit, events = self._accept_unit(runtime, acceptance, input_id, content, mode, idempotency_key, origin)
        handle = None
        if acceptance.created:
            handle = RunHandle(acceptance.slot.run_id, session_id, acceptance.slot,
                               background=origin in BACKGROUND_ORIGINS)
            self._register(runtime, handle)
            if self._starts_at_once(runtime, acceptance):
                begin_unit, begin_events, handle.prompt = self._begin_unit(runtime, handle)
                unit, events = unit + begin_unit, events + begin_events
        written = self.store.submit(unit, events)
        if handle is not None:
            handle.accepted = written
        if acceptance.to_interrupt is not None:
            self._interrupt(acceptance.to_interrupt.run_id, roll_back=mode is Mode.ROLLBACK)
        if acceptance.to_start is not None:
            self._start(runtime.handles[acceptance.to_start.run_id])
        try:
            await written
        except BaseException:
            self._forget_input(runtime, acceptance, input_id, idempotency_key)
            raise
        return accepted

    async def _seen_key(self, runtime: SessionRuntime, key: str) -> Accepted | None:
        seen = runtime.idempotency.get(key)
        if seen is not None:
            return seen
        row = await self.store.read(repo.input_by_idempotency_key, runtime.id, key)
        if row is not None:
            seen = Accepted(runtime.id, row.id, row.run_id, Disposition(row.disposition), duplicate=True)
            runtime.idempotency.setdefault(key, seen)
        return runtime.idempotency.get(key)

    def _accept_unit(
        self, runtime: SessionRuntime, acceptance: Acceptance, input_id: str, content: str, mode: Mode,
        idempotency_key: str | None, origin: str,
    ) -> tuple[list[ops.Op], list[NewEvent]]:
        slot, now = acceptance.slot, utcnow()
        run_row = queued_run_row(runtime.id, slot, now) if acceptance.created else None
        input_row = {
            "id": input_id, "session_id": runtime.id, "run_id": slot.run_id, "seq": runtime.last_input_seq,
            "content": content, "mode": mode.value, "disposition": acceptance.disposition.value,
            "status": InputStatus.PENDING.value, "origin": origin, "idempotency_key": idempotency_key,
            "created_at": now,
        }

        unit: list[ops.Op] = [ops.Insert(t.runs, [run_row])] if run_row is not None else []
        unit.append(ops.Insert(t.inputs, [input_row]))

        events = []
        if acceptance.created:
            events.append(NewEvent(runtime.id, EventType.RUN_QUEUED, slot.run_id,
                                   {"input_ids": [input_id], "mode": mode.value}))
        return unit, events

    def _forget_input(self, runtime: SessionRuntime, acceptance: Acceptance, input_id: str, key: str | None) -> None:
        """The accepting write failed: take the input back out of memory."""
        runtime.contents.pop(input_id, None)
        if key is not None:
            runtime.idempotency.pop(key, None)
        slot = acceptance.slot
        if not acceptance.created:
            for ids in (slot.input_ids, slot.inbox):
                if input_id in ids:
                    ids.remove(input_id)
            return
        handle = runtime.handles.pop(slot.run_id, None)
        self._runs.pop(slot.run_id, None)
        if runtime.lane.cancel_queued(slot.run_id) is None:
            handover = runtime.lane.finish(slot.run_id, lambda: new_id("run"))
            if handover.to_start is not None:
                self._start(runtime.handles[handover.to_start.run_id])
        if handle is not None:
            handle.finished.set()

    def _register(self, runtime: SessionRuntime, handle: RunHandle) -> None:
        runtime.handles[handle.run_id] = handle
        self._runs[handle.run_id] = handle

    def _start(self, handle: RunHandle, *, resume: bool = False) -> None:
        if not self.accepting:
            return  # left queued (or waiting) in the store; the next start picks it up
        task = self._spawn(self._drive(handle, resume=resume), f"run:{handle.run_id}")
        handle.task = task
        task.add_done_callback(lambda _: self._drive_ended(handle, task))

    def _drive_ended(self, handle: RunHandle, task: asyncio.Task[None]) -> None:
        """Record the end of a run whose task ended before ``_drive`` could.

        A task cancelled before its first step (an interrupt or hard cancel right after
        the run was created) never runs any of ``_drive``'s handlers; left alone, the
        run would hold its session's lane forever.
        """
        if handle.task is not task or handle.finished.is_set():
            return  # recorded, parked for an approval, or resumed by a newer task
        if handle.interrupted_by_shutdown or not self.accepting:
            handle.finished.set()  # never began here: stays queued (or waiting) in the store
            return
        self._spawn(self._finalize(handle, RunStatus.CANCELLED, error=_cancel_error(handle)),
                    f"cancelled:{handle.run_id}")

    # --- execution ------------------------------------------------------------------

    async def _drive(self, handle: RunHandle, *, resume: bool) -> None:
        """A run's whole life in this process: begin, step loop, outcome."""
        logs.bind_run(handle.run_id, handle.session_id)
        runtime = await self.sessions.get(handle.session_id)
        tracing.start_run(handle, runtime.agent, resumed=resume)
        if handle.accepted is not None:
            try:
                await asyncio.shield(handle.accepted)  # a cancel must not cancel the write
            except BaseException:
                return  # submit() undoes the acceptance and reports the error
        begun = resume or handle.prompt is not None
        try:
            if not resume:
                await self._debounce(handle)
            agent = await self.agents.wait_ready(runtime.agent)
            if handle.cancel_mode is not None and not begun:
                await self._finalize(handle, RunStatus.CANCELLED, error=_cancel_error(handle))
                return
            prompt: list[str] | None = handle.prompt
            if resume:
                await self._resume(handle)
            elif prompt is None:
                prompt = await self._begin(runtime, handle)
            begun = True
            while True:
                step_loop = self._runner(runtime, handle, agent, prompt)
                outcome = await step_loop.run()
                if isinstance(outcome, Finished):
                    await self._finalize(handle, RunStatus.COMPLETED, text=outcome.text, usage=step_loop.usage)
                    return
                if isinstance(outcome, Stopped):
                    await self._finalize(handle, self._stop_status(handle), text=outcome.partial,
                                         error=_cancel_error(handle), usage=step_loop.usage)
                    return
                assert isinstance(outcome, Parked)
                if await self._park(handle, outcome.calls):
                    return
        except asyncio.CancelledError:
            if handle.cancel_mode is not CancelMode.HARD:
                await asyncio.shield(self._finalize_quietly(handle, RunStatus.INTERRUPTED, begun))
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._finalize_quietly(handle, self._stop_status(handle), begun)
        except CorralError as exc:
            await self._finalize(handle, RunStatus.FAILED, error=_error(exc))
        except Exception as exc:
            log.exception("run %s crashed", handle.run_id)
            await self._finalize(handle, RunStatus.FAILED,
                                 error={"code": "internal", "message": f"{type(exc).__name__}: {exc}"})

    def _runner(
        self, runtime: SessionRuntime, handle: RunHandle, agent: AgentRuntime, prompt: list[str] | None
    ) -> StepLoop | AcpTurn:
        """What drives the run: the step loop over a model, or an external ACP agent."""
        def take_steers() -> list[SteerInput]:
            return self._take_steers(runtime, handle)

        if agent.spec.driver == "acp":
            return AcpTurn(self.store, agent, handle, prompt, take_steers, self.ask_approval)
        return StepLoop(self.store, self.conversations, agent, handle, handle.slot.policy, take_steers, self.tool_slot,
                        self.config.workspace_root / agent.name, self.metrics)

    async def _finalize_quietly(self, handle: RunHandle, status: RunStatus, begun: bool) -> None:
        if handle.interrupted_by_shutdown and (not begun or handle.status is RunStatus.WAITING):
            # Never started, or waiting at a boundary (on its subagents): it stays queued or
            # waiting in the store, and the next start takes it up where it was, as after a crash.
            return
        await self._finalize(handle, status, error=_cancel_error(handle))

    def _stop_status(self, handle: RunHandle) -> RunStatus:
        return RunStatus.INTERRUPTED if handle.interrupted_by_shutdown else RunStatus.CANCELLED

    async def _debounce(self, handle: RunHandle) -> None:
        slot = handle.slot
        loop = asyncio.get_running_loop()
        while slot.collect and slot.debounce_ms:
            remaining = slot.last_input_at + slot.debounce_ms / 1000 - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)

    async def _begin(self, runtime: SessionRuntime, handle: RunHandle) -> list[str]:
        """Move the run to ``running`` with its inputs as user messages; returns their texts."""
        unit, events, contents = self._begin_unit(runtime, handle)
        await self.store.write(unit, events)
        return contents

    def _begin_unit(self, runtime: SessionRuntime, handle: RunHandle) -> tuple[list[ops.Op], list[NewEvent], list[str]]:
        """What beginning a run writes (moved to ``running`` here, in memory, at once)."""
        self.metrics.lane_wait.observe(time.monotonic() - handle.queued_at)
        runtime.lane.mark_started(handle.run_id)
        handle.move(RunStatus.RUNNING)
        input_ids = list(handle.slot.input_ids)
        rows = [message_row(runtime.id, handle.run_id, "user", runtime.contents.pop(i), input_id=i)
                for i in input_ids]
        now = utcnow()

        unit: list[ops.Op] = [
            ops.UpdateRun(handle.run_id, status=RunStatus.RUNNING.value, started_at=now),
            ops.MoveInputs(input_ids, InputStatus.CONSUMED.value),
            ops.Insert(t.messages, rows),
        ]
        # The inputs' text rides along, so the event log alone can replay a conversation.
        contents: list[str] = [row["content"] for row in rows]
        started = {"input_ids": input_ids, "contents": contents}
        return unit, [NewEvent(runtime.id, EventType.RUN_STARTED, handle.run_id, started)], contents

    def _starts_at_once(self, runtime: SessionRuntime, acceptance: Acceptance) -> bool:
        """Whether a new run can begin in its accepting commit: it starts now (idle session),
        collects no later inputs, and its agent is ready. That saves a whole commit, the
        longest wait of a turn under load."""
        slot = acceptance.slot
        if acceptance.to_start is not slot or slot.collect or slot.debounce_ms or not self.accepting:
            return False
        return self.agents.ready_now(runtime.agent)

    async def wait_in_run(self, run_id: str, reason: dict[str, Any], until: Awaitable[None]) -> None:
        """Park a run in ``waiting`` while ``until`` is pending (a tool waiting on subagents): it
        holds no slot, shows as waiting, and goes back to ``running`` when ``until`` is done.
        A cancel meanwhile ends it from ``waiting``."""
        handle = self._runs[run_id]
        handle.move(RunStatus.WAITING)
        await self.store.write([ops.UpdateRun(run_id, status=RunStatus.WAITING.value)],
                               [NewEvent(handle.session_id, EventType.RUN_WAITING, run_id, reason)])
        await until
        await self._resume(handle)

    async def ask_approval(self, run_id: str, call: ToolCall) -> ApprovalStatus | None:
        """Ask a human about ``call`` for a run that stays alive meanwhile (an ACP agent's
        permission request, which the agent process waits on): the run shows as ``waiting``
        with the approval pending, as a parked run would. Returns the decision, or None if
        the run is cancelled or ends first."""
        handle = self._runs.get(run_id)
        if handle is None or handle.finished.is_set() or handle.cancel_mode is not None:
            return None
        decision: asyncio.Future[ApprovalStatus] = asyncio.get_running_loop().create_future()
        handle.approval_waiters[call.id] = decision
        handle.pending_approvals.add(call.id)
        unit, events = self._request_approvals(handle, [call])
        cancelled = asyncio.ensure_future(handle.cancel_signal.wait())
        try:
            await self.store.write(unit, events)
            either: set[asyncio.Future[Any]] = {decision, cancelled}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            return decision.result() if decision.done() and not decision.cancelled() else None
        finally:
            cancelled.cancel()
            handle.approval_waiters.pop(call.id, None)
            handle.pending_approvals.discard(call.id)
            if not handle.pending_approvals and handle.status is RunStatus.WAITING and not handle.finished.is_set():
                await self._resume(handle)

    async def _resume(self, handle: RunHandle) -> None:
        handle.move(RunStatus.RUNNING)
        await self.store.write([ops.UpdateRun(handle.run_id, status=RunStatus.RUNNING.value)])

    def _take_steers(self, runtime: SessionRuntime, handle: RunHandle) -> list[SteerInput]:
        ids = runtime.lane.take_steers(handle.run_id)
        handle.slot.input_ids.extend(ids)  # now part of this run's turn: requeued with it if interrupted
        return [SteerInput(i, runtime.contents.pop(i)) for i in ids]

    async def _park(self, handle: RunHandle, calls: list[ToolCall]) -> bool:
        """Record the wait for approvals; True if the run should now sleep (holding nothing)."""
        handle.pending_approvals = {call.id for call in calls}
        unit, events = self._request_approvals(handle, calls)
        await self.store.write(unit, events)
        if handle.pending_approvals and handle.cancel_mode is None:
            handle.task = None  # parked: decide() or cancel() picks it up
            return True
        if handle.cancel_mode is not None:
            await self._finalize(handle, self._stop_status(handle), error=_cancel_error(handle))
            return True
        await self._resume(handle)
        return False

    def _request_approvals(self, handle: RunHandle, calls: list[ToolCall]) -> tuple[list[ops.Op], list[NewEvent]]:
        """What asking a human about ``calls`` writes: the pending approvals and their events, and
        the run's move to ``waiting`` unless it is there already (moved here, in memory, at once)."""
        now, sid, run_id = utcnow(), handle.session_id, handle.run_id
        rows = [{"run_id": run_id, "call_id": c.id, "session_id": sid, "tool": c.name, "arguments": c.arguments,
                 "status": ApprovalStatus.PENDING.value, "created_at": now} for c in calls]
        unit: list[ops.Op] = [ops.Insert(t.approvals, rows)]
        events = [NewEvent(sid, EventType.APPROVAL_REQUESTED, run_id,
                           {"call_id": c.id, "tool": c.name, "arguments": c.arguments}) for c in calls]
        if handle.status is not RunStatus.WAITING:
            handle.move(RunStatus.WAITING)
            unit.append(ops.UpdateRun(run_id, status=RunStatus.WAITING.value))
            events.append(NewEvent(sid, EventType.RUN_WAITING, run_id, {"pending": [c.id for c in calls]}))
        return unit, events

    async def _finalize(
        self,
        handle: RunHandle,
        status: RunStatus,
        *,
        text: str | None = None,
        error: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        """Record a run's end: status, final message and terminal event in one transaction."""
        if handle.finished.is_set():
            return
        runtime = await self.sessions.get(handle.session_id)
        began = handle.status.is_active
        handle.move(status)
        if handle.hard_timer is not None:
            handle.hard_timer.cancel()
        handle.finished.set()
        for waiter in handle.approval_waiters.values():
            waiter.cancel()  # a question of a finished run has nobody left to ask
        self._runs.pop(handle.run_id, None)
        runtime.handles.pop(handle.run_id, None)
        queued_slot = runtime.lane.cancel_queued(handle.run_id)
        handover = runtime.lane.finish(handle.run_id, lambda: new_id("run"))
        requeue: Slot | None = None
        if status is RunStatus.INTERRUPTED and began and self.config.requeue_interrupted and handle.slot.input_ids:
            requeue = Slot(new_id("run"), handle.slot.position - 0.5, list(handle.slot.input_ids),
                           handle.slot.policy, urgent=True)
        if status is RunStatus.COMPLETED:
            runtime.completed_runs += 1  # here, before the write: counted in commit order
        completed_runs = runtime.completed_runs
        unit, events = self._final_unit(runtime, handle, status, text, error, usage, began,
                                        unstarted=queued_slot is not None or not began,
                                        requeued=handover.requeued, requeue=requeue)
        if handover.requeued is not None:
            self._register(runtime, RunHandle(handover.requeued.run_id, runtime.id, handover.requeued))
        if handover.to_start is not None:
            self._start(runtime.handles[handover.to_start.run_id])
        await self.store.write(unit, events)
        ended = RunEnd(handle.session_id, handle.run_id, status, text or None, error, continued=requeue is not None,
                       completed_runs=completed_runs)
        for listener in self._run_end_listeners:
            listener(ended)

    def _final_unit(
        self, runtime: SessionRuntime, handle: RunHandle, status: RunStatus, text: str | None,
        error: dict[str, Any] | None, usage: dict[str, int] | None, began: bool, *, unstarted: bool,
        requeued: Slot | None, requeue: Slot | None,
    ) -> tuple[list[ops.Op], list[NewEvent]]:
        now, run_id, sid = utcnow(), handle.run_id, runtime.id
        final_rows = [message_row(sid, run_id, "assistant", text)] if text else []
        roll_back = began and (handle.roll_back or requeue is not None)
        steer_moves = list(requeued.input_ids) if requeued else []
        new_runs = [slot for slot in (requeued, requeue) if slot is not None]
        if unstarted:
            for input_id in handle.slot.input_ids:
                runtime.contents.pop(input_id, None)

        unit: list[ops.Op] = [
            ops.UpdateRun(run_id, status=status.value, output=text or None, error=error, usage=usage, ended_at=now),
            ops.Insert(t.messages, final_rows),
            ops.Insert(t.runs, [queued_run_row(sid, slot, now) for slot in new_runs]),
        ]
        if unstarted:
            unit.append(ops.MoveInputs(list(handle.slot.input_ids), InputStatus.CANCELLED.value))
        if roll_back:
            unit.append(ops.RollBack(run_id))
            self.conversations.forget(sid)
        if requeued is not None:
            unit.append(ops.MoveInputs(steer_moves, InputStatus.PENDING.value, requeued.run_id))
        if requeue is not None:
            unit.append(ops.MoveInputs(list(requeue.input_ids), InputStatus.PENDING.value, requeue.run_id))

        events: list[NewEvent] = []
        if text:
            events.append(NewEvent(sid, EventType.MESSAGE_COMPLETED, run_id, {"role": "assistant", "content": text}))
        body: dict[str, Any] = {"status": status.value}
        if text:
            body["output"] = text
        if error:
            body["error"] = error
        if usage:
            body["usage"] = usage
        events.append(NewEvent(sid, TERMINAL_EVENT[status], run_id, body))
        for slot in new_runs:
            events.append(NewEvent(sid, EventType.INPUT_REQUEUED, slot.run_id,
                                   {"input_ids": list(slot.input_ids), "from_run_id": run_id, "run_id": slot.run_id}))
            events.append(NewEvent(sid, EventType.RUN_QUEUED, slot.run_id, {"input_ids": list(slot.input_ids)}))
        return unit, events

    # --- control messages: never queued behind work -----------------------------------

    async def cancel(self, run_id: str, mode: CancelMode) -> RunStatus:
        """Cancel a run; returns its status at the moment the request took effect."""
        handle = self._runs.get(run_id)
        if handle is None:
            return await self._status_of_ended(run_id)
        handle.cancel_reason = handle.cancel_reason or CancelReason.USER
        await self._cancel_handle(handle, mode)
        return handle.status

    def cancel_soon(self, run_id: str, mode: CancelMode) -> None:
        """Cancel from a context that cannot await (an observer going away)."""
        if run_id in self._runs and self.accepting:
            self._spawn(self._cancel_quietly(run_id, mode), f"cancel:{run_id}")

    async def _cancel_quietly(self, run_id: str, mode: CancelMode) -> None:
        try:
            await self.cancel(run_id, mode)
        except (NotFound, Conflict):
            pass  # it ended on its own meanwhile: nothing left to cancel

    async def _cancel_handle(self, handle: RunHandle, mode: CancelMode) -> None:
        if handle.status is RunStatus.QUEUED and handle.task is None:
            handle.request_cancel(mode)
            await self._finalize(handle, RunStatus.CANCELLED, error=_cancel_error(handle))
        elif handle.status is RunStatus.WAITING and handle.task is None:
            handle.request_cancel(mode)
            await self._finalize(handle, self._stop_status(handle), error=_cancel_error(handle))
        elif mode is CancelMode.HARD or handle.status is RunStatus.QUEUED or (
                handle.status is RunStatus.WAITING and not handle.approval_waiters):
            # A run waiting with a task (on its subagents) sits at a boundary: stopping it loses nothing.
            self._hard_cancel(handle)
        else:
            handle.request_cancel(CancelMode.SOFT)

    def _hard_cancel(self, handle: RunHandle) -> None:
        handle.request_cancel(CancelMode.HARD)
        if handle.task is not None and not handle.task.done():
            handle.task.cancel(handle.cancel_reason)

    def _interrupt(self, run_id: str, *, roll_back: bool) -> None:
        handle = self._runs.get(run_id)
        if handle is None:
            return
        handle.roll_back = handle.roll_back or roll_back
        handle.cancel_reason = handle.cancel_reason or CancelReason.INTERRUPTED
        if handle.task is None:
            self._spawn(self._cancel_handle(handle, CancelMode.SOFT), f"interrupt:{run_id}")
            return
        if handle.status is RunStatus.QUEUED:
            self._hard_cancel(handle)
            return
        handle.request_cancel(CancelMode.SOFT)
        if handle.hard_timer is None:
            handle.hard_timer = asyncio.get_running_loop().call_later(
                self.config.interrupt_grace_s, self._hard_cancel, handle
            )

    async def decide(self, run_id: str, call_id: str, decision: Decision) -> None:
        handle = self._runs.get(run_id)
        if handle is None:
            await self._status_of_ended(run_id)
            raise Conflict(f"run {run_id} is not waiting for approvals")
        if call_id not in handle.pending_approvals:
            raise NotFound(f"run {run_id} has no pending approval for call {call_id!r}")
        handle.pending_approvals.discard(call_id)
        status = ApprovalStatus.APPROVED if decision is Decision.APPROVE else ApprovalStatus.DENIED
        now = utcnow()
        await self.store.write(
            [ops.ResolveApproval(run_id, call_id, status.value, now)],
            [NewEvent(handle.session_id, EventType.APPROVAL_RESOLVED, run_id,
                      {"call_id": call_id, "decision": decision.value})],
        )
        waiter = handle.approval_waiters.get(call_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)  # a run that stayed alive for this answer (an ACP agent's)
            return
        if not handle.pending_approvals and handle.status is RunStatus.WAITING and handle.task is None:
            self._start(handle, resume=True)

    async def _status_of_ended(self, run_id: str) -> RunStatus:
        row = await self.store.read(repo.get_run, run_id)
        if row is None:
            raise NotFound(f"no run {run_id!r}")
        raise Conflict(f"run {run_id} already ended ({row.status})")

    # --- views --------------------------------------------------------------------------

    def run_handle(self, run_id: str) -> RunHandle | None:
        return self._runs.get(run_id)

    def session_view(self, session_id: str) -> dict[str, Any]:
        """What only memory knows about a session: its active run and how much waits behind it."""
        runtime = self.sessions.live(session_id)
        if runtime is None or runtime.lane.active is None:
            queued = runtime.lane.pending_inputs() if runtime is not None else 0
            return {"active_run_id": None, "active_status": None, "queued": queued}
        handle = self._runs.get(runtime.lane.active.run_id)
        return {
            "active_run_id": runtime.lane.active.run_id,
            "active_status": handle.status.value if handle is not None else None,
            "queued": runtime.lane.pending_inputs(),
        }

    def _observe_batch(self, units: int, seconds: float) -> None:
        self.metrics.commit_batch.observe(units)
        self.metrics.commit_latency.observe(seconds)

    def _state(self) -> dict[str, Any]:
        """Current-state gauges for a metrics scrape."""
        handles = list(self._runs.values())
        queued = {"interactive": 0, "background": 0}
        for handle in handles:
            if handle.status is RunStatus.QUEUED:
                queued["background" if handle.background else "interactive"] += len(handle.slot.input_ids)
        return {"active_runs": sum(1 for h in handles if h.status.is_active), "queued_by_class": queued,
                "observers": self.hub.observer_count(), "catch_ups": self.hub.catch_ups,
                "sessions_live": len(self.sessions.all_live())}

    def _session_created(self, row: dict[str, Any]) -> None:
        data = {key: value for key, value in row.items() if key != "created_at"}
        data["created_at"] = row["created_at"].isoformat()
        data["session_id"] = row["id"]  # like every event, so a feed reader routes notices alike
        self.hub.notify(row["id"], "session.created", {**data, **self.session_view(row["id"])})


def _error(exc: CorralError) -> dict[str, Any]:
    return {"code": exc.code, "message": str(exc)}


def _cancel_error(handle: RunHandle) -> dict[str, Any]:
    return {"code": "cancelled", "message": handle.cancel_reason or CancelReason.USER}


async def _wait_finished(handles: list[RunHandle], within: float) -> None:
    pending = [asyncio.ensure_future(h.finished.wait()) for h in handles if not h.finished.is_set()]
    if not pending:
        return
    _, not_done = await asyncio.wait(pending, timeout=within)
    for waiter in not_done:
        waiter.cancel()
