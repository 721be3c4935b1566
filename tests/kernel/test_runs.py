"""The run state transition table (``kernel/runs.py``): every allowed move, every refused one,
and no way out of a terminal state.

The expected table is written out here rather than read from ``ALLOWED``, so that a change to
the kernel's table is a change a reviewer sees in this file too.
"""

from __future__ import annotations

import itertools

import pytest

from corral.errors import InvalidTransition
from corral.kernel.lane import Slot
from corral.kernel.runs import ALLOWED, RunHandle, check_transition
from corral.types import RunStatus

S = RunStatus
TERMINAL = (S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED)
EXPECTED: dict[RunStatus, set[RunStatus]] = {
    # A queued run starts, or ends without starting (cancelled, failed to begin, cut off by a stop).
    S.QUEUED: {S.RUNNING, S.CANCELLED, S.FAILED, S.INTERRUPTED},
    # A running run parks for a human or a subagent, or ends in any way.
    S.RUNNING: {S.WAITING, S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED},
    # A waiting run resumes, or ends without completing (its answer needs a step it never took).
    S.WAITING: {S.RUNNING, S.CANCELLED, S.FAILED, S.INTERRUPTED},
    **{terminal: set() for terminal in TERMINAL},
}
PAIRS = list(itertools.product(RunStatus, repeat=2))
ALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b in EXPECTED[a]]
REFUSED_PAIRS = [(a, b) for a, b in PAIRS if b not in EXPECTED[a]]


def handle_in(status: RunStatus) -> RunHandle:
    handle = RunHandle("run_t", "ses_t", Slot("run_t", 1.0, ["in_t"]))
    handle.status = status  # placed there directly: the state is the subject, not how it was reached
    return handle


def ids(pair: tuple[RunStatus, RunStatus]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_the_table_is_the_expected_one_and_names_every_state() -> None:
    assert set(ALLOWED) == set(RunStatus)
    assert {state: set(targets) for state, targets in ALLOWED.items()} == EXPECTED
    assert len(ALLOWED_PAIRS) == 13 and len(REFUSED_PAIRS) == len(RunStatus) ** 2 - 13


@pytest.mark.parametrize("pair", ALLOWED_PAIRS, ids=ids)
def test_every_allowed_transition_moves_the_run(pair: tuple[RunStatus, RunStatus]) -> None:
    current, target = pair
    check_transition("run_t", current, target)  # raises nothing
    handle = handle_in(current)
    handle.move(target)
    assert handle.status is target


@pytest.mark.parametrize("pair", REFUSED_PAIRS, ids=ids)
def test_every_refused_transition_raises_and_leaves_the_state_unchanged(pair: tuple[RunStatus, RunStatus]) -> None:
    current, target = pair
    with pytest.raises(InvalidTransition, match=f"run run_t: {current.value} -> {target.value} is not allowed"):
        check_transition("run_t", current, target)
    handle = handle_in(current)
    with pytest.raises(InvalidTransition) as refused:
        handle.move(target)
    assert refused.value.code == "invalid_transition"
    assert handle.status is current


@pytest.mark.parametrize("terminal", TERMINAL, ids=lambda s: s.value)
def test_a_terminal_state_has_no_exit(terminal: RunStatus) -> None:
    assert terminal.is_terminal
    assert ALLOWED[terminal] == frozenset()
    handle = handle_in(terminal)
    for target in RunStatus:
        with pytest.raises(InvalidTransition):
            handle.move(target)
        assert handle.status is terminal


def test_terminal_means_no_exit_and_nothing_goes_back_to_queued() -> None:
    """``RunStatus.is_terminal`` and the table agree, no state moves to itself, and a run is never
    queued again (a re-queue is a new run carrying the same inputs)."""
    assert {s for s in RunStatus if s.is_terminal} == {s for s in RunStatus if not ALLOWED[s]}
    assert all(state not in ALLOWED[state] for state in RunStatus)
    assert all(S.QUEUED not in targets for targets in ALLOWED.values())


def test_every_state_can_reach_an_end() -> None:
    """No state is a trap: from each, some path of allowed moves ends the run."""
    for start in RunStatus:
        seen, frontier = {start}, [start]
        while frontier:
            for target in ALLOWED[frontier.pop()]:
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert seen & set(TERMINAL), start


def test_a_run_through_its_life_and_a_refused_step_on_the_way() -> None:
    handle = handle_in(S.QUEUED)
    for step in (S.RUNNING, S.WAITING, S.RUNNING, S.WAITING, S.RUNNING):
        handle.move(step)
    with pytest.raises(InvalidTransition):
        handle.move(S.QUEUED)  # started runs never queue again
    assert handle.status is S.RUNNING
    handle.move(S.COMPLETED)
    with pytest.raises(InvalidTransition):
        handle.move(S.RUNNING)  # nor do finished ones start again
    assert handle.status is S.COMPLETED
