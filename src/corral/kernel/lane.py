"""The lane: arrival order and the single active run of one session.

Pure and synchronous on purpose: every decision about who runs next is made here
without an ``await``, so on the event loop it is atomic, and the hypothesis state
machine in ``tests/kernel/test_lane_stateful.py`` can drive it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.errors import SessionBusy, TooManyPending
from corral.types import Disposition, ExecPolicy, InputId, Mode, RunId

if TYPE_CHECKING:
    from corral.providers.base import ModelOptions


@dataclass(eq=False)
class Slot:
    """One run as the lane sees it: the inputs it will carry and where it stands."""

    run_id: RunId
    position: float
    input_ids: list[InputId]
    policy: ExecPolicy = ExecPolicy.CONTINUE
    collect: bool = False
    # Urgent slots (interrupts, requeued steers) stand before ordinary queued work.
    urgent: bool = False
    debounce_ms: int = 0
    last_input_at: float = 0.0
    started: bool = False
    # Steer inputs accepted for this (active) run, not yet taken at a step boundary.
    inbox: list[InputId] = field(default_factory=list)
    # What the client's request adds to the run's model calls (its own tools, tool_choice,
    # response_format); a run that carries its inputs on (re-queued) takes it along.
    model_options: ModelOptions | None = None

    def __repr__(self) -> str:
        return f"<Slot {self.run_id} inputs={len(self.input_ids)} inbox={len(self.inbox)}>"


@dataclass(frozen=True)
class Acceptance:
    disposition: Disposition
    slot: Slot
    created: bool
    to_start: Slot | None = None
    to_interrupt: Slot | None = None


@dataclass(frozen=True)
class Handover:
    """What finishing the active run set in motion."""

    requeued: Slot | None
    to_start: Slot | None


class Lane:
    """At most one active slot; queued slots start strictly in list order."""

    def __init__(self, *, max_pending: int, top_position: float = 0.0):
        self.max_pending = max_pending
        # Invariant: `active` is None only when `queued` is empty (idle lane); a slot
        # leaves `queued` only by becoming `active` or by being cancelled.
        self.active: Slot | None = None
        self.queued: list[Slot] = []
        self._top = top_position

    def __repr__(self) -> str:
        active = self.active.run_id if self.active else None
        return f"<Lane active={active} queued={len(self.queued)} pending={self.pending_inputs()}>"

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self.queued)

    def pending_inputs(self) -> int:
        waiting = sum(len(slot.input_ids) for slot in self.queued)
        return waiting + (len(self.active.inbox) if self.active else 0)

    def accept(
        self,
        input_id: InputId,
        mode: Mode,
        new_run_id: RunId,
        *,
        policy: ExecPolicy = ExecPolicy.CONTINUE,
        debounce_ms: int = 0,
        now: float = 0.0,
    ) -> Acceptance:
        """Place one input; raise ``SessionBusy``/``TooManyPending`` and change nothing."""
        if not self.busy:
            slot = self._new_slot(new_run_id, input_id, policy, collect=mode is Mode.COLLECT,
                                  debounce_ms=debounce_ms, now=now)
            self.active = slot
            return Acceptance(Disposition.STARTED, slot, created=True, to_start=slot)
        if mode is Mode.REJECT:
            raise SessionBusy("the session is busy and the message's mode is 'reject'")
        if self.pending_inputs() >= self.max_pending:
            raise TooManyPending(f"the session already has {self.max_pending} inputs waiting")
        assert self.active is not None
        if mode is Mode.STEER:
            # Interrupts already waiting doom the active run: steer the newest of them
            # instead, so the steer neither dies with the run nor overtakes them.
            doomed_by = next((slot for slot in reversed(self.queued) if slot.urgent), None)
            if doomed_by is not None:
                doomed_by.input_ids.append(input_id)
                return Acceptance(Disposition.STEERED, doomed_by, created=False)
            self.active.inbox.append(input_id)
            return Acceptance(Disposition.STEERED, self.active, created=False)
        if mode is Mode.COLLECT:
            target = self._collect_target()
            if target is not None:
                target.input_ids.append(input_id)
                target.last_input_at = now
                target.debounce_ms = max(target.debounce_ms, debounce_ms)
                return Acceptance(Disposition.COLLECTED, target, created=False)
            slot = self._new_slot(new_run_id, input_id, policy, collect=True, debounce_ms=debounce_ms, now=now)
            self.queued.append(slot)
            return Acceptance(Disposition.QUEUED, slot, created=True)
        if mode in (Mode.INTERRUPT, Mode.ROLLBACK):
            slot = self._new_slot(new_run_id, input_id, policy, urgent=True, now=now)
            self._insert_urgent(slot)
            return Acceptance(Disposition.QUEUED, slot, created=True, to_interrupt=self.active)
        slot = self._new_slot(new_run_id, input_id, policy, now=now)
        self.queued.append(slot)
        return Acceptance(Disposition.QUEUED, slot, created=True)

    def take_steers(self, run_id: RunId) -> list[InputId]:
        """Hand the active run its steer inputs (called at a step boundary)."""
        if self.active is None or self.active.run_id != run_id:
            return []
        taken, self.active.inbox = self.active.inbox, []
        return taken

    def mark_started(self, run_id: RunId) -> None:
        if self.active is not None and self.active.run_id == run_id:
            self.active.started = True

    def finish(self, run_id: RunId, new_run_id: Callable[[], RunId]) -> Handover:
        """The active run ended: untaken steers become the next run, then the head starts."""
        if self.active is None or self.active.run_id != run_id:
            return Handover(None, None)
        ended, self.active = self.active, None
        requeued = None
        if ended.inbox:
            requeued = Slot(new_run_id(), self._front_position(), list(ended.inbox), urgent=True)
            self.queued.insert(0, requeued)
        if self.queued:
            self.active = self.queued.pop(0)
        return Handover(requeued, self.active)

    def cancel_queued(self, run_id: RunId) -> Slot | None:
        for index, slot in enumerate(self.queued):
            if slot.run_id == run_id:
                return self.queued.pop(index)
        return None

    def restore(self, active: Slot | None, queued: list[Slot]) -> Slot | None:
        """Rebuild after a restart; returns the slot to start if nothing is active."""
        self.active = active
        self.queued = sorted(queued, key=lambda slot: slot.position)
        for slot in self.queued:
            self._top = max(self._top, slot.position)
        if active is not None:
            self._top = max(self._top, active.position)
            return None
        if self.queued:
            self.active = self.queued.pop(0)
            return self.active
        return None

    def _collect_target(self) -> Slot | None:
        # An unstarted active run with steers waiting is closed to collects: joining its
        # opening messages would put them before the earlier steers (invariant 16).
        joinable = self.active is not None and not self.active.started and not self.active.inbox
        candidates = ([self.active] if self.active and joinable else []) + self.queued
        last = candidates[-1] if candidates else None
        if last is not None and last.collect and not last.started:
            return last
        return None

    def _new_slot(self, run_id: RunId, input_id: InputId, policy: ExecPolicy, *, collect: bool = False,
                  urgent: bool = False, debounce_ms: int = 0, now: float = 0.0) -> Slot:
        self._top += 1.0
        return Slot(run_id, self._top, [input_id], policy, collect=collect, urgent=urgent,
                    debounce_ms=debounce_ms, last_input_at=now)

    def _front_position(self) -> float:
        if self.queued:
            return self.queued[0].position - 1.0
        self._top += 1.0
        return self._top

    def _insert_urgent(self, slot: Slot) -> None:
        index = 0
        while index < len(self.queued) and self.queued[index].urgent:
            index += 1
        before = self.queued[index - 1].position if index > 0 else None
        after = self.queued[index].position if index < len(self.queued) else None
        if after is None:
            slot.position = self._top  # already the newest position
        elif before is None:
            slot.position = after - 1.0
        else:
            slot.position = (before + after) / 2.0
        self.queued.insert(index, slot)
