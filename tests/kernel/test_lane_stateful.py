"""A hypothesis state machine over the pure ``Lane``: random arrivals in every mode,
runs that begin, take steers and finish (with or without taking them), and cancels of
queued runs. The model plays the kernel's part and checks, after every step:

Invariant 1 -- at most one active run: a run begins only once the previous one has
ended, ``active`` is empty only when nothing is queued, and every waiting input sits in
exactly one place.

Invariant 2 / 16 -- ordering. "Carried" order is the order in which inputs enter the
model's context: a run's own inputs when it begins, then each steer when it is taken.
For two carried inputs ``e`` accepted before ``x``, ``e`` is carried first, with one
exception: ordinary work (``queue``/``collect``, or any mode accepted by an idle lane)
may be overtaken by a later ``interrupt``/``rollback`` (they stand in front of ordinary
queued work) or a later ``steer`` (it goes into the active run). In particular a
queue-mode input never starts before anything accepted earlier, urgent inputs keep
their order among themselves, and a steer is never overtaken by a later message.

Invariant 6 -- a steer is taken by the run that was active when it arrived, or is part
of the very next run to start, skipping all ordinary queued work. "Next" yields only to
what was already ahead of it: earlier steers of the same run (requeued together or just
before it) and interrupts accepted earlier -- if interrupts were waiting when it arrived
(the active run is being cancelled), it joins the newest of them. Nothing is ever lost:
once drained, every accepted input was carried or belongs to a run that was cancelled
before it started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.errors import SessionBusy, TooManyPending
from corral.kernel.lane import Lane
from corral.types import Disposition, Mode

MAX_PENDING = 6
URGENT = {Mode.INTERRUPT, Mode.ROLLBACK}
MODES = st.sampled_from(list(Mode))


@dataclass
class InputInfo:
    seq: int
    mode: Mode
    idle: bool  # accepted by an idle lane (started at once, whatever its mode)
    # For steers: the run active at acceptance, the interrupts waiting then, and how
    # many runs had begun by then.
    active_run: str | None = None
    waiting_interrupts: list[str] = field(default_factory=list)
    begun_before: int = 0


class LaneMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lane = Lane(max_pending=MAX_PENDING)
        self._inputs = count(1)
        self._runs = count(1)
        self.info: dict[str, InputInfo] = {}
        self.carried: list[str] = []  # context order
        self.carried_by: dict[str, str] = {}
        self.cancelled: set[str] = set()
        self.begun: list[str] = []  # runs in the order they began
        self.run_inputs: dict[str, list[str]] = {}  # what each begun run carried at its start
        self.running: str | None = None  # begun and not yet finished

    def new_run(self) -> str:
        return f"run{next(self._runs)}"

    # --- what the kernel does ---------------------------------------------------------

    @rule(mode=MODES, debounce=st.sampled_from([0, 50]))
    def arrive(self, mode: Mode, debounce: int) -> None:
        lane = self.lane
        input_id = f"in{next(self._inputs)}"
        was_busy, pending = lane.busy, lane.pending_inputs()
        active_run = lane.active.run_id if lane.active else None
        interrupts = [s.run_id for s in lane.queued if s.urgent]
        try:
            acceptance = lane.accept(input_id, mode, self.new_run(), debounce_ms=debounce)
        except SessionBusy:
            assert was_busy and mode is Mode.REJECT
            return
        except TooManyPending:
            assert was_busy and mode is not Mode.REJECT and pending >= MAX_PENDING
            return
        assert not (was_busy and mode is Mode.REJECT), "reject must refuse a busy session"
        assert not was_busy or pending < MAX_PENDING
        info = InputInfo(len(self.info), mode, idle=not was_busy)
        self.info[input_id] = info
        if not was_busy:
            assert acceptance.disposition is Disposition.STARTED and acceptance.to_start is lane.active
            return
        if mode is Mode.STEER:
            assert acceptance.disposition is Disposition.STEERED
            info.active_run, info.waiting_interrupts, info.begun_before = active_run, interrupts, len(self.begun)
        elif mode in URGENT:
            assert acceptance.disposition is Disposition.QUEUED and acceptance.slot.urgent
            assert acceptance.to_interrupt is lane.active
        elif mode is Mode.COLLECT:
            assert acceptance.disposition in (Disposition.QUEUED, Disposition.COLLECTED)
            assert acceptance.slot.collect
        else:
            assert acceptance.disposition is Disposition.QUEUED and acceptance.created

    @rule(modes=st.lists(MODES, min_size=2, max_size=5))
    def burst(self, modes: list[Mode]) -> None:
        """Several arrivals with nothing in between (a run's start often comes later)."""
        for mode in modes:
            self.arrive(mode, 0)

    @precondition(lambda self: not self.lane.busy)
    @rule(modes=st.lists(MODES, min_size=1, max_size=4))
    def debounced_burst(self, modes: list[Mode]) -> None:
        """A collect message opens a run that debounces before it begins; more arrive."""
        self.arrive(Mode.COLLECT, 300)
        for mode in modes:
            self.arrive(mode, 300)

    @precondition(lambda self: self.lane.active is not None and not self.lane.active.started)
    @rule()
    def begin(self) -> None:
        slot = self.lane.active
        assert slot is not None
        assert self.running is None, "a run began while another was still running (invariant 1)"
        self.lane.mark_started(slot.run_id)
        assert slot.started
        self.running = slot.run_id
        self.begun.append(slot.run_id)
        self.run_inputs[slot.run_id] = list(slot.input_ids)
        for input_id in slot.input_ids:
            self._carry(input_id, slot.run_id)

    @precondition(lambda self: self.running is not None)
    @rule()
    def step_boundary(self) -> None:
        assert self.running is not None
        for input_id in self.lane.take_steers(self.running):
            self._carry(input_id, self.running)

    @precondition(lambda self: self.lane.active is not None)
    @rule(take_steers_first=st.booleans())
    def finish(self, take_steers_first: bool) -> None:
        """The active run ends: completed, failed, or cancelled (before it began, too)."""
        slot = self.lane.active
        assert slot is not None
        if take_steers_first and slot.started:
            self.step_boundary()
        untaken = list(slot.inbox)
        if slot.started:
            self.running = None
        else:
            self.cancelled.update(slot.input_ids)  # cancelled before it began: so are its inputs
        handover = self.lane.finish(slot.run_id, self.new_run)
        if untaken:
            assert handover.requeued is not None and handover.requeued.input_ids == untaken
            assert handover.to_start is handover.requeued, "requeued steers must be the very next run"
        else:
            assert handover.requeued is None
        assert handover.to_start is self.lane.active

    @precondition(lambda self: bool(self.lane.queued))
    @rule(data=st.data())
    def cancel_queued(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.lane.queued) - 1), label="queued index")
        run_id = self.lane.queued[index].run_id
        slot = self.lane.cancel_queued(run_id)
        assert slot is not None and slot.run_id == run_id
        assert all(s.run_id != run_id for s in self.lane.queued)
        self.cancelled.update(slot.input_ids)

    # --- bookkeeping and checks ----------------------------------------------------------

    def _carry(self, input_id: str, run_id: str) -> None:
        assert input_id not in self.carried_by, f"{input_id} carried twice"
        assert input_id not in self.cancelled
        for already in self.carried:
            if self.info[already].seq > self.info[input_id].seq:
                self._check_overtake(earlier=input_id, later=already)
        self.carried.append(input_id)
        self.carried_by[input_id] = run_id
        info = self.info[input_id]
        if info.mode is Mode.STEER and not info.idle:
            self._check_steer_destination(input_id, info, run_id)

    def _check_steer_destination(self, input_id: str, info: InputInfo, run_id: str) -> None:
        """Invariant 6: taken by the run it was steered into, or part of the very next run.

        "Next" yields only to what was already ahead of the steer: runs that begin in
        between may carry nothing but earlier interrupts and earlier steers -- never
        ordinary queued work, and nothing accepted after it.
        """
        if run_id == info.active_run:
            return
        for other in self.begun[info.begun_before:]:
            if other in (info.active_run, run_id):
                continue
            for carried in self.run_inputs[other]:
                earlier = self.info[carried]
                assert earlier.seq < info.seq and not earlier.idle and (
                    earlier.mode in URGENT or earlier.mode is Mode.STEER
                ), f"steer {input_id} (into {info.active_run}) ran in {run_id}, after {other} carrying {carried}"
        if not info.waiting_interrupts:
            # Nothing urgent was waiting: only earlier steers of the same run may go first.
            assert all(self.info[c].mode is Mode.STEER for r in self.begun[info.begun_before:]
                       if r not in (info.active_run, run_id) for c in self.run_inputs[r])

    def _pending_in_lane(self) -> list[str]:
        lane = self.lane
        ids: list[str] = []
        if lane.active is not None:
            if not lane.active.started:
                ids += lane.active.input_ids
            ids += lane.active.inbox
        for slot in lane.queued:
            ids += slot.input_ids
            assert not slot.inbox, "only the active run has an inbox"
            assert not slot.started
        return ids

    @invariant()
    def one_active_run_and_every_input_in_one_place(self) -> None:
        lane = self.lane
        if lane.active is None:
            assert not lane.queued, "work is queued but nothing is active"
            assert self.running is None
        else:
            assert self.running in (None, lane.active.run_id)
            assert lane.active.started is (self.running is not None)
        run_ids = [s.run_id for s in lane.queued] + ([lane.active.run_id] if lane.active else [])
        assert len(run_ids) == len(set(run_ids))
        pending = self._pending_in_lane()
        assert len(pending) == len(set(pending)), "an input sits in two places"
        expected = {i for i in self.info if i not in self.carried_by and i not in self.cancelled}
        assert set(pending) == expected, "an input was lost or duplicated"
        assert lane.pending_inputs() <= len(pending)
        positions = [s.position for s in lane.queued]
        assert positions == sorted(positions) and len(set(positions)) == len(positions), (
            "queued positions must follow the queue, so a restart rebuilds the same order"
        )

    def _check_overtake(self, earlier: str, later: str) -> None:
        """``later`` was accepted after ``earlier`` but carried first: only some modes may."""
        e, x = self.info[earlier], self.info[later]
        ordinary = e.idle or e.mode in (Mode.QUEUE, Mode.COLLECT)
        may_overtake = x.mode in URGENT or x.mode is Mode.STEER
        assert ordinary and may_overtake and not x.idle, (
            f"{later} ({x.mode.value}) was carried before the earlier {earlier} ({e.mode.value})"
        )

    def carried_in_acceptance_order(self) -> None:
        """The whole carried order, pair by pair (``_carry`` checks each step as it happens)."""
        for index, later in enumerate(self.carried):
            for earlier in self.carried[index + 1:]:
                if self.info[earlier].seq < self.info[later].seq:
                    self._check_overtake(earlier=earlier, later=later)

    def teardown(self) -> None:
        """Drain the lane like the kernel would; nothing accepted may be left behind."""
        for _ in range(1000):
            slot = self.lane.active
            if slot is None:
                break
            if not slot.started:
                self.begin()
            self.finish(take_steers_first=True)
            self.one_active_run_and_every_input_in_one_place()
        assert not self.lane.busy
        assert set(self.info) == set(self.carried_by) | self.cancelled
        self.carried_in_acceptance_order()


LaneMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLaneMachine = LaneMachine.TestCase
