"""Young runs' heads: whole while kept, and let go by every rule that bounds them."""

from __future__ import annotations

from corral.clock import utcnow
from corral.events import Event
from corral.kernel.run_heads import RunHeads
from corral.types import EventType


def event(seq: int, run_id: str | None, kind: str = EventType.MESSAGE_DELTA, session: str = "ses_a") -> Event:
    return Event(session, seq, kind, run_id, {}, utcnow())


def test_a_tracked_run_keeps_every_event_of_its_own_until_its_end() -> None:
    heads = RunHeads()
    heads.track("run_a", "ses_a")
    assert heads.after("run_a", 0) == []  # created, nothing committed yet: a whole (empty) head
    heads.add([event(1, "run_a"), event(2, None), event(3, "run_b"), event(4, "run_a")])
    assert [e.seq for e in heads.after("run_a", 0) or []] == [1, 4]
    assert [e.seq for e in heads.after("run_a", 1) or []] == [4]
    assert heads.after("run_b", 0) is None  # never tracked (recovered, or another node's): the store
    heads.add([event(5, "run_a", EventType.RUN_COMPLETED)])
    assert heads.after("run_a", 0) is None and len(heads) == 0


def test_a_head_past_its_size_is_let_go_whole_never_cut() -> None:
    heads = RunHeads(max_events=2)
    heads.track("run_a", "ses_a")
    heads.add([event(1, "run_a"), event(2, "run_a")])
    assert heads.after("run_a", 0) is not None
    heads.add([event(3, "run_a")])
    assert heads.after("run_a", 0) is None


def test_the_oldest_run_is_let_go_past_the_runs_kept() -> None:
    heads = RunHeads(max_runs=2)
    for run in ("run_a", "run_b", "run_c"):
        heads.track(run, "ses_a")
    assert [heads.after(run, 0) is not None for run in ("run_a", "run_b", "run_c")] == [False, True, True]


def test_a_hint_for_a_session_lets_its_heads_go() -> None:
    heads = RunHeads()
    heads.track("run_a", "ses_a")
    heads.track("run_b", "ses_b")
    heads.forget_session("ses_a")
    assert heads.after("run_a", 0) is None and heads.after("run_b", 0) == []
