"""Unit tests of the pure ``Lane``: who runs now, who runs next, and what is refused.

The lane makes every ordering decision synchronously; these tests drive it directly,
without a kernel, an event loop or a store.
"""

from __future__ import annotations

from itertools import count

import pytest

from corral.errors import SessionBusy, TooManyPending
from corral.kernel.lane import Lane, Slot
from corral.types import Disposition, ExecPolicy, Mode


class Ids:
    """Readable, predictable run ids for the lane under test."""

    def __init__(self) -> None:
        self._n = count(1)

    def __call__(self) -> str:
        return f"run{next(self._n)}"


@pytest.fixture
def ids() -> Ids:
    return Ids()


def busy_lane(ids: Ids, max_pending: int = 100) -> Lane:
    """A lane whose active run ``run1`` carries input ``a``."""
    lane = Lane(max_pending=max_pending)
    lane.accept("a", Mode.QUEUE, ids())
    lane.mark_started("run1")
    return lane


def queued_inputs(lane: Lane) -> list[list[str]]:
    return [list(slot.input_ids) for slot in lane.queued]


def positions_increase(lane: Lane) -> bool:
    positions = [slot.position for slot in lane.queued]
    return all(a < b for a, b in zip(positions, positions[1:], strict=False))


# --- an idle lane starts every mode at once -------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_idle_lane_starts_any_mode(mode: Mode, ids: Ids) -> None:
    lane = Lane(max_pending=10)
    acceptance = lane.accept("a", mode, ids(), policy=ExecPolicy.PAUSE)
    assert acceptance.disposition is Disposition.STARTED
    assert acceptance.created
    assert acceptance.to_start is acceptance.slot
    assert acceptance.to_interrupt is None
    assert lane.active is acceptance.slot
    assert lane.queued == []
    assert acceptance.slot.input_ids == ["a"]
    assert acceptance.slot.policy is ExecPolicy.PAUSE
    assert acceptance.slot.collect is (mode is Mode.COLLECT)
    assert not acceptance.slot.urgent
    assert lane.busy


def test_a_new_lane_is_idle() -> None:
    lane = Lane(max_pending=3)
    assert not lane.busy
    assert lane.active is None
    assert lane.pending_inputs() == 0


# --- a busy lane: one test per mode ---------------------------------------------------


def test_busy_queue_appends_in_order(ids: Ids) -> None:
    lane = busy_lane(ids)
    first = lane.accept("b", Mode.QUEUE, ids())
    second = lane.accept("c", Mode.QUEUE, ids())
    for acceptance in (first, second):
        assert acceptance.disposition is Disposition.QUEUED
        assert acceptance.created
        assert acceptance.to_start is None
        assert acceptance.to_interrupt is None
    assert [s.run_id for s in lane.queued] == ["run2", "run3"]
    assert queued_inputs(lane) == [["b"], ["c"]]
    assert lane.active is not None and lane.active.run_id == "run1"
    assert positions_increase(lane)
    assert lane.active.position < lane.queued[0].position
    assert lane.pending_inputs() == 2


def test_busy_reject_raises_and_changes_nothing(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    before = (lane.active, list(lane.queued), lane.pending_inputs())
    with pytest.raises(SessionBusy):
        lane.accept("c", Mode.REJECT, ids())
    assert (lane.active, list(lane.queued), lane.pending_inputs()) == before


def test_reject_is_refused_while_only_a_queued_run_exists(ids: Ids) -> None:
    """Busy means any work at all: an active run that has not begun yet counts."""
    lane = Lane(max_pending=10)
    lane.accept("a", Mode.COLLECT, ids(), debounce_ms=500)  # active, not started (debouncing)
    with pytest.raises(SessionBusy):
        lane.accept("b", Mode.REJECT, ids())


def test_too_many_pending_at_max_and_nothing_changes(ids: Ids) -> None:
    lane = busy_lane(ids, max_pending=3)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("c", Mode.COLLECT, ids())
    lane.accept("d", Mode.STEER, ids())  # steers in the inbox count as pending too
    assert lane.pending_inputs() == 3
    snapshot = (queued_inputs(lane), list(lane.active.inbox) if lane.active else None)
    for mode in (Mode.QUEUE, Mode.COLLECT, Mode.STEER, Mode.INTERRUPT, Mode.ROLLBACK):
        with pytest.raises(TooManyPending):
            lane.accept("x", mode, ids())
    assert (queued_inputs(lane), list(lane.active.inbox) if lane.active else None) == snapshot
    # Reject is checked first: a busy session answers 409, not 429.
    with pytest.raises(SessionBusy):
        lane.accept("y", Mode.REJECT, ids())


def test_pending_frees_up_when_work_starts(ids: Ids) -> None:
    lane = busy_lane(ids, max_pending=1)
    lane.accept("b", Mode.QUEUE, ids())
    with pytest.raises(TooManyPending):
        lane.accept("c", Mode.QUEUE, ids())
    handover = lane.finish("run1", ids)
    assert handover.to_start is not None and handover.to_start.input_ids == ["b"]
    assert lane.pending_inputs() == 0  # the active run's own inputs are not "waiting"
    lane.accept("c", Mode.QUEUE, ids())


def test_collect_creates_a_collect_slot_then_joins_it(ids: Ids) -> None:
    lane = busy_lane(ids)
    first = lane.accept("b", Mode.COLLECT, ids(), now=1.0, debounce_ms=100)
    assert first.disposition is Disposition.QUEUED and first.created
    assert first.slot.collect
    second = lane.accept("c", Mode.COLLECT, ids(), now=2.0, debounce_ms=300)
    third = lane.accept("d", Mode.COLLECT, ids(), now=3.0, debounce_ms=50)
    for acceptance in (second, third):
        assert acceptance.disposition is Disposition.COLLECTED
        assert not acceptance.created
        assert acceptance.slot is first.slot
    assert queued_inputs(lane) == [["b", "c", "d"]]
    assert first.slot.last_input_at == 3.0  # the burst's last input restarts the debounce
    assert first.slot.debounce_ms == 300  # the longest debounce asked for wins


def test_collect_joins_only_the_tail_slot(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.COLLECT, ids())
    lane.accept("c", Mode.QUEUE, ids())
    late = lane.accept("d", Mode.COLLECT, ids())
    # Joining "b" would let "d" overtake "c": a new collect slot goes at the tail instead.
    assert late.disposition is Disposition.QUEUED and late.created
    assert queued_inputs(lane) == [["b"], ["c"], ["d"]]
    lane.accept("e", Mode.COLLECT, ids())
    assert queued_inputs(lane) == [["b"], ["c"], ["d", "e"]]


def test_collect_does_not_join_a_queue_slot(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    acceptance = lane.accept("c", Mode.COLLECT, ids())
    assert acceptance.disposition is Disposition.QUEUED
    assert queued_inputs(lane) == [["b"], ["c"]]


def test_collect_joins_the_active_slot_until_it_starts(ids: Ids) -> None:
    """An idle lane's collect run debounces before it starts; the burst joins it."""
    lane = Lane(max_pending=10)
    first = lane.accept("a", Mode.COLLECT, ids(), debounce_ms=200, now=0.0)
    joined = lane.accept("b", Mode.COLLECT, ids(), now=0.1)
    assert joined.disposition is Disposition.COLLECTED and joined.slot is first.slot
    assert first.slot.input_ids == ["a", "b"]
    lane.mark_started(first.slot.run_id)
    after_start = lane.accept("c", Mode.COLLECT, ids())
    assert after_start.disposition is Disposition.QUEUED and after_start.created
    assert queued_inputs(lane) == [["c"]]


def test_collect_does_not_join_an_active_queue_slot(ids: Ids) -> None:
    lane = Lane(max_pending=10)
    lane.accept("a", Mode.QUEUE, ids())  # active but not yet marked started
    acceptance = lane.accept("b", Mode.COLLECT, ids())
    assert acceptance.disposition is Disposition.QUEUED
    assert lane.active is not None and lane.active.input_ids == ["a"]


def test_steer_goes_to_the_active_inbox(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    first = lane.accept("s1", Mode.STEER, ids())
    second = lane.accept("s2", Mode.STEER, ids())
    for acceptance in (first, second):
        assert acceptance.disposition is Disposition.STEERED
        assert not acceptance.created
        assert acceptance.slot is lane.active
        assert acceptance.to_start is None and acceptance.to_interrupt is None
    assert lane.active is not None and lane.active.inbox == ["s1", "s2"]
    assert queued_inputs(lane) == [["b"]]
    assert lane.pending_inputs() == 3


def test_take_steers_hands_over_the_inbox_once(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("s1", Mode.STEER, ids())
    lane.accept("s2", Mode.STEER, ids())
    assert lane.take_steers("run-other") == []
    assert lane.take_steers("run1") == ["s1", "s2"]
    assert lane.take_steers("run1") == []
    assert lane.pending_inputs() == 0
    lane.accept("s3", Mode.STEER, ids())
    assert lane.take_steers("run1") == ["s3"]


@pytest.mark.parametrize("mode", [Mode.INTERRUPT, Mode.ROLLBACK])
def test_interrupt_goes_in_front_of_ordinary_work(mode: Mode, ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("c", Mode.COLLECT, ids())
    acceptance = lane.accept("i", mode, ids())
    assert acceptance.disposition is Disposition.QUEUED and acceptance.created
    assert acceptance.slot.urgent
    assert acceptance.to_interrupt is lane.active
    assert acceptance.to_start is None
    assert queued_inputs(lane) == [["i"], ["b"], ["c"]]
    assert positions_increase(lane)


def test_urgent_slots_keep_their_order_among_themselves(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("i1", Mode.INTERRUPT, ids())
    lane.accept("c", Mode.QUEUE, ids())
    lane.accept("r2", Mode.ROLLBACK, ids())
    lane.accept("i3", Mode.INTERRUPT, ids())
    assert queued_inputs(lane) == [["i1"], ["r2"], ["i3"], ["b"], ["c"]]
    # Positions agree with the list, so a restart rebuilds the same order.
    assert positions_increase(lane)


def test_interrupt_into_an_empty_queue_and_after_urgent_only(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("i1", Mode.INTERRUPT, ids())
    lane.accept("i2", Mode.INTERRUPT, ids())
    assert queued_inputs(lane) == [["i1"], ["i2"]]
    assert positions_increase(lane)
    lane.accept("b", Mode.QUEUE, ids())
    assert queued_inputs(lane) == [["i1"], ["i2"], ["b"]]
    assert positions_increase(lane)


def test_collect_after_an_interrupt_still_targets_the_tail(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("c1", Mode.COLLECT, ids())
    lane.accept("i", Mode.INTERRUPT, ids())
    joined = lane.accept("c2", Mode.COLLECT, ids())
    assert joined.disposition is Disposition.COLLECTED
    assert queued_inputs(lane) == [["i"], ["c1", "c2"]]


# --- finishing the active run -----------------------------------------------------------


def test_finish_starts_the_head(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("c", Mode.QUEUE, ids())
    handover = lane.finish("run1", ids)
    assert handover.requeued is None
    assert handover.to_start is lane.active
    assert lane.active is not None and lane.active.input_ids == ["b"]
    assert queued_inputs(lane) == [["c"]]


def test_finish_of_the_last_run_leaves_the_lane_idle(ids: Ids) -> None:
    lane = busy_lane(ids)
    handover = lane.finish("run1", ids)
    assert handover.requeued is None and handover.to_start is None
    assert not lane.busy
    again = lane.accept("b", Mode.QUEUE, ids())
    assert again.disposition is Disposition.STARTED


def test_finish_of_a_run_that_is_not_active_does_nothing(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    handover = lane.finish("run2", ids)  # queued, not active
    assert handover.requeued is None and handover.to_start is None
    assert lane.active is not None and lane.active.run_id == "run1"
    assert queued_inputs(lane) == [["b"]]


def test_finish_turns_untaken_steers_into_the_next_run(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("s1", Mode.STEER, ids())
    lane.accept("s2", Mode.STEER, ids())
    lane.accept("i", Mode.INTERRUPT, ids())  # after the steers: they keep their turn
    handover = lane.finish("run1", lambda: "run-requeued")
    requeued = handover.requeued
    assert requeued is not None
    assert requeued.run_id == "run-requeued"
    assert requeued.input_ids == ["s1", "s2"]
    assert requeued.urgent and requeued.inbox == []
    # The steers become the very next run, before everything that was queued.
    assert handover.to_start is requeued
    assert lane.active is requeued
    assert queued_inputs(lane) == [["i"], ["b"]]
    assert requeued.position < lane.queued[0].position


def test_finish_after_taking_steers_requeues_nothing(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("s1", Mode.STEER, ids())
    assert lane.take_steers("run1") == ["s1"]
    handover = lane.finish("run1", ids)
    assert handover.requeued is None and handover.to_start is None
    assert not lane.busy


def test_requeued_steers_in_an_otherwise_idle_lane(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("s", Mode.STEER, ids())
    handover = lane.finish("run1", ids)
    assert handover.requeued is not None and handover.to_start is handover.requeued
    assert lane.active is handover.requeued
    assert lane.active.position > 1.0  # newer than anything before it
    assert lane.queued == []


def test_steer_into_a_collect_run_that_has_not_started(ids: Ids) -> None:
    lane = Lane(max_pending=10)
    lane.accept("a", Mode.COLLECT, ids(), debounce_ms=100)
    acceptance = lane.accept("s", Mode.STEER, ids())
    assert acceptance.disposition is Disposition.STEERED
    assert lane.active is not None and lane.active.inbox == ["s"]
    assert lane.active.input_ids == ["a"]
    # A later collect must not join the run's opening messages, ahead of the steer.
    later = lane.accept("c", Mode.COLLECT, ids())
    assert later.disposition is Disposition.QUEUED and later.created
    assert lane.active.input_ids == ["a"]
    assert queued_inputs(lane) == [["c"]]


@pytest.mark.parametrize("mode", [Mode.INTERRUPT, Mode.ROLLBACK])
def test_steer_after_an_interrupt_joins_the_interrupting_run(mode: Mode, ids: Ids) -> None:
    """The active run is being cancelled: a steer goes to the run that replaces it."""
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("i1", mode, ids())
    newest = lane.accept("i2", Mode.INTERRUPT, ids())
    acceptance = lane.accept("s", Mode.STEER, ids())
    assert acceptance.disposition is Disposition.STEERED
    assert not acceptance.created
    assert acceptance.slot is newest.slot
    assert acceptance.to_interrupt is None  # the active run is already being interrupted
    assert lane.active is not None and lane.active.inbox == []
    assert queued_inputs(lane) == [["i1"], ["i2", "s"], ["b"]]
    assert lane.pending_inputs() == 4
    handover = lane.finish("run1", ids)
    assert handover.requeued is None
    assert handover.to_start is not None and handover.to_start.input_ids == ["i1"]


# --- cancelling queued work -------------------------------------------------------------


def test_cancel_queued_removes_only_that_slot(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    lane.accept("c", Mode.QUEUE, ids())
    lane.accept("d", Mode.QUEUE, ids())
    removed = lane.cancel_queued("run3")
    assert removed is not None and removed.input_ids == ["c"]
    assert queued_inputs(lane) == [["b"], ["d"]]
    assert lane.cancel_queued("run3") is None
    assert lane.cancel_queued("run1") is None  # the active run is not queued
    assert lane.active is not None and lane.active.run_id == "run1"


def test_cancelling_the_collect_tail_lets_the_next_collect_open_a_new_slot(ids: Ids) -> None:
    lane = busy_lane(ids)
    lane.accept("b", Mode.QUEUE, ids())
    collect = lane.accept("c", Mode.COLLECT, ids())
    lane.cancel_queued(collect.slot.run_id)
    fresh = lane.accept("d", Mode.COLLECT, ids())
    assert fresh.created and fresh.disposition is Disposition.QUEUED
    assert queued_inputs(lane) == [["b"], ["d"]]


# --- restore after a restart -------------------------------------------------------------


def test_restore_sorts_by_position_and_starts_the_head() -> None:
    lane = Lane(max_pending=10)
    slots = [Slot("r3", 3.0, ["c"]), Slot("r1", 1.0, ["a"]), Slot("r2", 2.5, ["b"])]
    to_start = lane.restore(None, slots)
    assert to_start is not None and to_start.run_id == "r1"
    assert lane.active is to_start
    assert [s.run_id for s in lane.queued] == ["r2", "r3"]
    # New work gets a position after everything restored.
    acceptance = lane.accept("d", Mode.QUEUE, "r4")
    assert acceptance.slot.position > 3.0
    assert [s.run_id for s in lane.queued] == ["r2", "r3", "r4"]


def test_restore_with_an_active_waiting_run_starts_nothing() -> None:
    lane = Lane(max_pending=10)
    active = Slot("r1", 5.0, [], started=True, inbox=["s"])
    to_start = lane.restore(active, [Slot("r2", 6.0, ["b"])])
    assert to_start is None
    assert lane.active is active
    assert [s.run_id for s in lane.queued] == ["r2"]
    assert lane.pending_inputs() == 2
    acceptance = lane.accept("c", Mode.QUEUE, "r3")
    assert acceptance.slot.position > 6.0
    # An active slot with a higher position than the queue still raises the top.
    other = Lane(max_pending=10)
    other.restore(Slot("r9", 9.0, [], started=True), [])
    assert other.accept("x", Mode.QUEUE, "r10").slot.position > 9.0


def test_restore_of_nothing_leaves_the_lane_idle() -> None:
    lane = Lane(max_pending=10, top_position=7.0)
    assert lane.restore(None, []) is None
    assert not lane.busy
    assert lane.accept("a", Mode.QUEUE, "r1").slot.position > 7.0
