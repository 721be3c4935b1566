"""The model's context built from stored rows: calls left open by an ended run get a result."""

from __future__ import annotations

from types import SimpleNamespace

from corral.loop.messages import (
    NO_ANSWER,
    NO_RESULT,
    StoredMessage,
    build_context,
    current_run,
    steps_taken,
    unresolved_calls,
)


def row(run_id: str, role: str, content: str = "", calls: list[str] | None = None,
        answers: str | None = None) -> StoredMessage:
    tool_calls = [{"id": c, "name": "wait", "arguments": {}} for c in calls] if calls else None
    return StoredMessage.from_row(SimpleNamespace(id=0, run_id=run_id, role=role, content=content,
                                                  tool_calls=tool_calls, tool_call_id=answers))


def shape(rows: list[StoredMessage], run_id: str) -> list[tuple[str, str | None, str]]:
    return [(m.role, m.tool_call_id, m.content) for m in build_context(rows, run_id)]


def test_a_complete_history_is_unchanged() -> None:
    rows = [row("r1", "user", "hi"), row("r1", "assistant", calls=["a", "b"]), row("r1", "tool", "A", answers="a"),
            row("r1", "tool", "B", answers="b"), row("r1", "assistant", "done")]
    assert shape(rows, "r2") == [("user", None, "hi"), ("assistant", None, ""), ("tool", "a", "A"),
                                 ("tool", "b", "B"), ("assistant", None, "done")]


def test_calls_of_an_ended_run_get_a_synthetic_result_before_the_next_message() -> None:
    rows = [row("r1", "user", "hi"), row("r1", "assistant", calls=["a", "b"]), row("r1", "tool", "A", answers="a"),
            row("r2", "user", "next")]
    assert shape(rows, "r2") == [("user", None, "hi"), ("assistant", None, ""), ("tool", "a", "A"),
                                 ("tool", "b", NO_RESULT), ("assistant", None, NO_ANSWER), ("user", None, "next")]


def test_open_calls_at_the_end_are_closed_unless_they_are_the_current_runs() -> None:
    rows = [row("r1", "user", "hi"), row("r1", "assistant", calls=["a"])]
    assert shape(rows, "r2")[-1] == ("tool", "a", NO_RESULT)
    # The current run resuming after an approval answers its own calls itself.
    assert shape(rows, "r1")[-1] == ("assistant", None, "")


def test_a_run_that_ended_without_an_answer_is_closed_by_a_note() -> None:
    rows = [row("r1", "user", "/fail"), row("r2", "user", "hello")]
    assert shape(rows, "r2") == [("user", None, "/fail"), ("assistant", None, NO_ANSWER), ("user", None, "hello")]
    answered = [row("r1", "user", "hi"), row("r1", "assistant", "hello"), row("r2", "user", "again")]
    assert NO_ANSWER not in [m[2] for m in shape(answered, "r2")]
    # A steer is part of its run, and messages seeded without a run are not a run that ended.
    steered = [row("r1", "user", "/steps 2 1"), row("r1", "assistant", calls=["a"]),
               row("r1", "tool", "ok", answers="a"), row("r1", "user", "steer")]
    assert NO_ANSWER not in [m[2] for m in shape(steered, "r1")]
    seeded = [row("", "user", "earlier"), row("r1", "user", "now")]
    assert NO_ANSWER not in [m[2] for m in shape(seeded, "r1")]


def test_steps_and_open_calls_count_only_the_current_runs_tail() -> None:
    earlier = [row("r1", "user", "hi"), row("r1", "assistant", calls=["a"]), row("r1", "tool", "A", answers="a"),
               row("r1", "assistant", calls=["b"])]  # r1 ended with "b" unanswered
    own = [row("r2", "user", "go"), row("r2", "assistant", calls=["c"]), row("r2", "tool", "C", answers="c"),
           row("r2", "assistant", calls=["d", "e"]), row("r2", "tool", "D", answers="d")]
    rows = earlier + own
    assert current_run(rows, "r2") == own
    assert steps_taken(rows, "r2") == 2  # r1's two steps are not r2's
    assert [call.id for call in unresolved_calls(rows, "r2")] == ["e"]
    assert unresolved_calls(earlier + own[:3], "r2") == []  # its latest step is answered
    assert steps_taken(rows, "r3") == 0 and unresolved_calls(rows, "r3") == []  # a run yet to write
