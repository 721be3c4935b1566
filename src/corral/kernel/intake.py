"""How a message gets in: accepted durably, in order, at most once per Idempotency-Key.

``submit`` decides synchronously (the session's lane places the input, memory records
it) and then waits for the one write that makes the input accepted (HTTP 202). If that
write fails, nothing was accepted: the decision is taken back out of memory and the
caller gets the store's error (503 with Retry-After for an unavailable store).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

from corral.clock import utcnow
from corral.errors import InvalidInput, SessionBusy, ShuttingDown, TooManyPending
from corral.events import NewEvent
from corral.kernel.lane import Acceptance
from corral.kernel.repair import refused_while_repairing
from corral.kernel.runs import RunHandle, new_run
from corral.kernel.sessions import Accepted, SessionRuntime
from corral.records import NewInput, Writes
from corral.types import Disposition, EventType, ExecPolicy, Mode, new_id

if TYPE_CHECKING:
    from corral.kernel.kernel import Kernel
    from corral.providers.base import ModelOptions

# Inputs from these origins run in the background class (see kernel/slots.py).
BACKGROUND_ORIGINS = frozenset({"scheduler"})


class Intake:
    def __init__(self, kernel: Kernel):
        self._k = kernel

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
        model_options: ModelOptions | None = None,
    ) -> Accepted:
        """Accept one input durably; returns once it is committed (HTTP 202).

        ``model_options`` (a client's own tools, tool_choice, response_format) belong to the run
        the input starts, so they need a mode that gives it one: ``queue``, ``interrupt``,
        ``rollback`` or ``reject``."""
        k = self._k
        if model_options is not None and mode in (Mode.STEER, Mode.COLLECT):
            raise InvalidInput(f"a message with its own tools or response format needs a run of its own; mode "
                               f"{mode.value!r} may join another run")
        self._check_accepting()
        runtime = await k.sessions.get(session_id)
        if idempotency_key is not None:
            seen = await self._seen_key(runtime, idempotency_key)
            if seen is not None:
                return seen
            self._check_accepting()
            # The read above awaited: the session may have been evicted and loaded again meanwhile,
            # and a concurrent request with the same key may have been accepted. From here to the
            # lane's decision nothing awaits (a live session is returned at once).
            runtime = await k.sessions.get(session_id)
            seen = runtime.idempotency.get(idempotency_key)
            if seen is not None:
                return seen
        if runtime.repairing:
            raise refused_while_repairing(runtime)
        # --- synchronous: decide, record in memory, submit the write -----------------
        input_id, fresh_run = new_id("in"), new_id("run")
        try:
            acceptance = runtime.lane.accept(input_id, mode, fresh_run, policy=policy, debounce_ms=debounce_ms,
                                             now=asyncio.get_running_loop().time())
        except (SessionBusy, TooManyPending) as exc:
            k.metrics.inputs_rejected.labels(exc.code).inc()
            raise
        if acceptance.created:
            acceptance.slot.model_options = model_options
        runtime.last_input_seq += 1
        runtime.contents[input_id] = content
        accepted = Accepted(session_id, input_id, acceptance.slot.run_id, acceptance.disposition)
        if idempotency_key is not None:
            runtime.idempotency.put(idempotency_key, replace(accepted, duplicate=True))
        writes = self._accept_writes(runtime, acceptance, input_id, content, mode, idempotency_key, origin)
        handle = None
        if acceptance.created:
            handle = RunHandle(acceptance.slot.run_id, session_id, acceptance.slot,
                               background=origin in BACKGROUND_ORIGINS)
            k.register(runtime, handle)
            k.hub.heads.track(handle.run_id, session_id)  # before any event of it can commit
            if self._starts_at_once(runtime, acceptance):
                begin, handle.prompt = k.driver.begin_transition(runtime, handle)
                writes = writes + begin
        written = k.store.accept(writes)
        if handle is not None:
            handle.accepted = written
        if acceptance.to_interrupt is not None:
            k.control.interrupt(acceptance.to_interrupt.run_id, roll_back=mode is Mode.ROLLBACK)
        if acceptance.to_start is not None:
            k.driver.start(runtime.handles[acceptance.to_start.run_id])
        try:
            await written
        except BaseException:
            self._forget_input(runtime, acceptance, input_id, idempotency_key)
            raise
        return accepted

    def _check_accepting(self) -> None:
        if not self._k.accepting:
            raise ShuttingDown("the server is shutting down and takes no new messages")

    async def _seen_key(self, runtime: SessionRuntime, key: str) -> Accepted | None:
        seen = runtime.idempotency.get(key)
        if seen is not None:
            return seen
        row = await self._k.store.input_by_key(runtime.id, key)
        if row is None:
            return None
        seen = Accepted(runtime.id, row.id, row.run_id, Disposition(row.disposition), duplicate=True)
        runtime.idempotency.put(key, seen)
        return seen

    def _accept_writes(self, runtime: SessionRuntime, acceptance: Acceptance, input_id: str, content: str,
                       mode: Mode, idempotency_key: str | None, origin: str) -> Writes:
        slot, now = acceptance.slot, utcnow()
        writes = Writes(inputs=[NewInput(input_id, runtime.id, slot.run_id, runtime.last_input_seq, content,
                                         mode.value, acceptance.disposition.value, origin, idempotency_key, now)])
        if acceptance.created:
            writes.runs.append(new_run(runtime.id, slot, now))
            writes.events.append(NewEvent(runtime.id, EventType.RUN_QUEUED, slot.run_id,
                                          {"input_ids": [input_id], "mode": mode.value}))
        return writes

    def _forget_input(self, runtime: SessionRuntime, acceptance: Acceptance, input_id: str, key: str | None) -> None:
        """The accepting write failed: take the input back out of memory."""
        runtime.contents.pop(input_id, None)
        if key is not None:
            runtime.idempotency.pop(key)
        slot = acceptance.slot
        if not acceptance.created:
            for ids in (slot.input_ids, slot.inbox):
                if input_id in ids:
                    ids.remove(input_id)
            return
        handle = runtime.handles.pop(slot.run_id, None)
        self._k.runs.pop(slot.run_id, None)
        self._k.hub.heads.forget(slot.run_id)
        if runtime.held is handle:
            runtime.held = None
        if runtime.lane.cancel_queued(slot.run_id) is None:
            handover = runtime.lane.finish(slot.run_id, lambda: new_id("run"))
            if handover.to_start is not None:
                self._k.driver.start(runtime.handles[handover.to_start.run_id])
        if handle is not None:
            handle.finished.set()
            handle.recorded.set()  # nothing of it was ever recorded, and nothing is to be

    def _starts_at_once(self, runtime: SessionRuntime, acceptance: Acceptance) -> bool:
        """Whether a new run can begin in its accepting commit: it starts now (idle session, no
        end of it still being written), collects no later inputs, and its agent is ready. That
        saves a whole commit, the longest wait of a turn under load."""
        slot = acceptance.slot
        if acceptance.to_start is not slot or slot.collect or slot.debounce_ms or not self._k.accepting:
            return False
        return not runtime.unsettled and self._k.agents.ready_now(runtime.agent)
