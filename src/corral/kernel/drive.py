"""How a run goes: begin, hand it to its runner, park it for approvals, resume it.

A run's task is spawned in a scope of its own (``kernel/supervision.py``): what the
runner raises that is not a ``CorralError`` escapes ``drive`` and the scope fails that
run, and only that run (``Ending.crashed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from corral import logs, tracing
from corral.clock import utcnow
from corral.errors import CorralError, RunWriteFailed
from corral.events import NewEvent
from corral.kernel.agents import AgentRuntime
from corral.kernel.ending import cancel_error, error_of
from corral.kernel.ports import Finished, Parked, RunContext, Runner, SteerInput, Stopped
from corral.kernel.repair import write_until_committed
from corral.kernel.runs import RunHandle
from corral.kernel.sessions import SessionRuntime
from corral.records import InputMove, NewApproval, NewClientCall, NewMessage, RunChange, Writes
from corral.types import ApprovalStatus, CancelMode, EventType, InputStatus, RunStatus

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel
    from corral.providers.base import ToolCall

log = logging.getLogger(__name__)


class Driver:
    def __init__(self, kernel: Kernel):
        self._k = kernel

    def start(self, handle: RunHandle, *, resume: bool = False) -> None:
        """Spawn the run's task, unless intake has stopped (then it stays queued or waiting in
        the store and the next start takes it up) or an end of its session is still being
        written (then it is held, and started once that end commits)."""
        if not self._k.accepting:
            return
        runtime = self._k.sessions.live(handle.session_id)
        if runtime is not None and runtime.unsettled and not resume:
            runtime.held = handle
            return
        task = self._k.supervisor.spawn(self.drive(handle, resume=resume), f"run:{handle.run_id}",
                                        on_error=lambda exc: self._k.ending.crashed(handle, exc))
        handle.task = task
        task.add_done_callback(lambda _: self._drive_ended(handle, task))

    def _drive_ended(self, handle: RunHandle, task: asyncio.Task[None]) -> None:
        """Record the end of a run whose task ended before ``drive`` could.

        A task cancelled before its first step (an interrupt or hard cancel right after
        the run was created) never runs any of ``drive``'s handlers; left alone, the
        run would hold its session's lane forever.
        """
        if handle.task is not task or handle.finished.is_set():
            return  # recorded, parked for an approval, or resumed by a newer task
        if handle.interrupted_by_shutdown or not self._k.accepting:
            handle.finished.set()  # never began here: stays queued (or waiting) in the store
            handle.recorded.set()
            return
        self._k.supervisor.spawn(self._k.ending.end(handle, RunStatus.CANCELLED, error=cancel_error(handle)),
                                 f"cancelled:{handle.run_id}")

    async def drive(self, handle: RunHandle, *, resume: bool) -> None:
        """A run's whole life in this process: begin, runner, outcome."""
        logs.bind_run(handle.run_id, handle.session_id)
        ending = self._k.ending
        runtime = await self._k.sessions.get(handle.session_id)
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
            agent = await self._k.agents.wait_ready(runtime.agent)
            if handle.cancel_mode is not None and not begun:
                await ending.end(handle, RunStatus.CANCELLED, error=cancel_error(handle))
                return
            prompt: list[str] | None = handle.prompt
            if resume:
                await self.resume(handle)
            elif prompt is None:
                prompt = await self._begin(runtime, handle)
            begun = True
            while True:
                runner = self._runner(runtime, handle, agent, prompt)
                outcome = await runner.run()
                if isinstance(outcome, Finished):
                    await ending.end(handle, RunStatus.COMPLETED, text=outcome.text, usage=runner.usage)
                    return
                if isinstance(outcome, Stopped):
                    await ending.end(handle, self.stop_status(handle), text=outcome.partial,
                                     error=cancel_error(handle), usage=runner.usage)
                    return
                assert isinstance(outcome, Parked)
                if await self._park(handle, outcome):
                    return
        except asyncio.CancelledError:
            if handle.cancel_mode is not CancelMode.HARD:
                await asyncio.shield(self._end_cut_off(handle, RunStatus.INTERRUPTED, begun))
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._end_cut_off(handle, self.stop_status(handle), begun)
        except CorralError as exc:
            await ending.end(handle, RunStatus.FAILED, error=error_of(exc))

    def _runner(self, runtime: SessionRuntime, handle: RunHandle, agent: AgentRuntime,
                prompt: list[str] | None) -> Runner:
        def take_steers() -> list[SteerInput]:
            return self._take_steers(runtime, handle)

        k = self._k
        return k.backends.runner(RunContext(k.store, k.conversations, agent, handle, prompt, take_steers,
                                            k.ask_approval, k.tool_slot, k.config.workspace_root / agent.name,
                                            k.metrics))

    async def _end_cut_off(self, handle: RunHandle, status: RunStatus, begun: bool) -> None:
        if handle.interrupted_by_shutdown and (not begun or handle.status is RunStatus.WAITING):
            # Never started, or waiting at a boundary (on its subagents): it stays queued or
            # waiting in the store, and the next start takes it up where it was, as after a crash.
            return
        await self._k.ending.end(handle, status, error=cancel_error(handle))

    @staticmethod
    def stop_status(handle: RunHandle) -> RunStatus:
        return RunStatus.INTERRUPTED if handle.interrupted_by_shutdown else RunStatus.CANCELLED

    async def _debounce(self, handle: RunHandle) -> None:
        slot = handle.slot
        loop = asyncio.get_running_loop()
        while slot.collect and slot.debounce_ms:
            remaining = slot.last_input_at + slot.debounce_ms / 1000 - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)

    # --- beginning: a transition, then its write (repaired until it commits) ---------------

    async def _begin(self, runtime: SessionRuntime, handle: RunHandle) -> list[str]:
        """Move the run to ``running`` with its inputs as user messages; returns their texts."""
        writes, contents = self.begin_transition(runtime, handle)
        begun: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        handle.begun = begun
        committed = await asyncio.shield(asyncio.ensure_future(self._write_begin(runtime, handle, writes)))
        if not committed:
            raise RunWriteFailed("the store refused to record the run's start")
        return contents

    async def _write_begin(self, runtime: SessionRuntime, handle: RunHandle, writes: Writes) -> bool:
        assert handle.begun is not None
        done = await write_until_committed(self._k.store.begin_run, writes, runtime, self._k.config,
                                           what=f"the start of run {handle.run_id}")
        handle.begun.set_result(done is not None)
        return done is not None

    def begin_transition(self, runtime: SessionRuntime, handle: RunHandle) -> tuple[Writes, list[str]]:
        """What beginning a run writes (moved to ``running`` here, in memory, at once)."""
        self._k.metrics.lane_wait.observe(time.monotonic() - handle.queued_at)
        runtime.lane.mark_started(handle.run_id)
        handle.move(RunStatus.RUNNING)
        input_ids = list(handle.slot.input_ids)
        sid, run_id = runtime.id, handle.run_id
        contents = [runtime.contents.pop(i) for i in input_ids]
        writes = Writes(
            messages=[NewMessage(sid, run_id, "user", text, input_id=i) for i, text in zip(input_ids, contents,
                                                                                          strict=True)],
            run_changes=[RunChange(run_id, status=RunStatus.RUNNING, started_at=utcnow())],
            input_moves=[InputMove(input_ids, InputStatus.CONSUMED)],
            # The inputs' text rides along, so the event log alone can replay a conversation.
            events=[NewEvent(sid, EventType.RUN_STARTED, run_id, {"input_ids": input_ids, "contents": contents})],
        )
        return writes, contents

    def _take_steers(self, runtime: SessionRuntime, handle: RunHandle) -> list[SteerInput]:
        ids = runtime.lane.take_steers(handle.run_id)
        handle.slot.input_ids.extend(ids)  # now part of this run's turn: requeued with it if interrupted
        return [SteerInput(i, runtime.contents.pop(i)) for i in ids]

    # --- waiting: for approvals, for subagents ------------------------------------------

    async def resume(self, handle: RunHandle) -> None:
        handle.move(RunStatus.RUNNING)
        await self._k.store.record(Writes(run_changes=[RunChange(handle.run_id, status=RunStatus.RUNNING)]))

    async def _park(self, handle: RunHandle, parked: Parked) -> bool:
        """Record the wait for approvals and for the client's results; True if the run should now
        sleep (holding nothing)."""
        handle.pending_approvals = {call.id for call in parked.calls}
        handle.pending_client_calls = {call.id: call for call in parked.client_calls}
        await self._k.store.record(self.approvals_requested(handle, parked.calls, client_calls=parked.client_calls,
                                                            usage=parked.usage))
        if (handle.pending_approvals or handle.pending_client_calls) and handle.cancel_mode is None:
            handle.task = None  # parked: decide(), the client's results or cancel() pick it up
            if handle.pending_client_calls:
                self._k.client_tools.start_timer(handle)
            return True
        if handle.cancel_mode is not None:
            await self._k.ending.end(handle, self.stop_status(handle), error=cancel_error(handle))
            return True
        await self.resume(handle)
        return False

    def approvals_requested(self, handle: RunHandle, calls: Sequence[ToolCall], *,
                            client_calls: Sequence[ToolCall] = (), usage: dict[str, int] | None = None) -> Writes:
        """What asking a human about ``calls`` (and the client for the results of ``client_calls``)
        writes: the pending approvals and client calls and their events, and the run's move to
        ``waiting`` unless it is there already (moved here, in memory, at once).

        A client call is a ``tool.started`` (with ``client: true``) now and its ``tool.completed``
        when the result comes; ``run.waiting`` lists the client calls, the calls a client's answer
        returns (``finish_reason: tool_calls``), with the usage of the run's model calls so far."""
        now, sid, run_id = utcnow(), handle.session_id, handle.run_id
        writes = Writes(
            approvals=[NewApproval(run_id, c.id, sid, c.name, c.arguments, now) for c in calls],
            client_calls=[NewClientCall(run_id, c.id, sid, c.name, c.arguments, now) for c in client_calls],
            events=[NewEvent(sid, EventType.APPROVAL_REQUESTED, run_id,
                             {"call_id": c.id, "tool": c.name, "arguments": c.arguments}) for c in calls],
        )
        writes.events += [NewEvent(sid, EventType.TOOL_STARTED, run_id,
                                   {"call_id": c.id, "tool": c.name, "arguments": c.arguments, "client": True})
                          for c in client_calls]
        if handle.status is not RunStatus.WAITING:
            handle.move(RunStatus.WAITING)
            writes.run_changes.append(RunChange(run_id, status=RunStatus.WAITING))
            waiting: dict[str, Any] = {"pending": [c.id for c in [*calls, *client_calls]]}
            if client_calls:
                waiting["client_calls"] = [c.as_json() for c in client_calls]
                waiting["usage"] = usage or {}
            writes.events.append(NewEvent(sid, EventType.RUN_WAITING, run_id, waiting))
        return writes

    async def wait_in_run(self, run_id: str, reason: dict[str, Any], until: Awaitable[None]) -> None:
        handle = self._k.runs[run_id]
        handle.move(RunStatus.WAITING)
        await self._k.store.record(Writes(run_changes=[RunChange(run_id, status=RunStatus.WAITING)],
                                          events=[NewEvent(handle.session_id, EventType.RUN_WAITING, run_id, reason)]))
        await until
        await self.resume(handle)

    async def ask_approval(self, run_id: str, call: ToolCall) -> ApprovalStatus | None:
        handle = self._k.runs.get(run_id)
        if handle is None or handle.finished.is_set() or handle.cancel_mode is not None:
            return None
        decision: asyncio.Future[ApprovalStatus] = asyncio.get_running_loop().create_future()
        handle.approval_waiters[call.id] = decision
        handle.pending_approvals.add(call.id)
        writes = self.approvals_requested(handle, [call])
        cancelled = asyncio.ensure_future(handle.cancel_signal.wait())
        try:
            await self._k.store.record(writes)
            either: set[asyncio.Future[Any]] = {decision, cancelled}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            return decision.result() if decision.done() and not decision.cancelled() else None
        finally:
            cancelled.cancel()
            handle.approval_waiters.pop(call.id, None)
            handle.pending_approvals.discard(call.id)
            if not handle.pending_approvals and handle.status is RunStatus.WAITING and not handle.finished.is_set():
                await self.resume(handle)
