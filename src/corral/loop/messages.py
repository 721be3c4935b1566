"""Conversion between stored message rows and the model's context."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from corral.clock import utcnow
from corral.kernel.conversations import StoredMessage
from corral.providers.base import ChatMessage, ToolCall


def message_row(
    session_id: str,
    run_id: str,
    role: str,
    content: str,
    *,
    tool_calls: Sequence[ToolCall] | None = None,
    tool_call_id: str | None = None,
    input_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "run_id": run_id,
        "input_id": input_id,
        "role": role,
        "content": content,
        "tool_calls": [call.as_json() for call in tool_calls] if tool_calls else None,
        "tool_call_id": tool_call_id,
        "rolled_back": False,
        "created_at": now or utcnow(),
    }


NO_RESULT = "error: no result: the run ended (cancelled, failed or interrupted) before this call finished"


NO_ANSWER = "(no answer: this turn ended before it was finished)"


def build_context(rows: Sequence[StoredMessage], run_id: str) -> list[ChatMessage]:
    """The model's view of the stored conversation.

    A run cut off inside a tool call leaves calls without results, which model APIs reject
    ("every tool call needs a result"): each such call of an earlier run gets a synthetic
    error result right after its step. A run that ended without an answer (cancelled,
    failed) gets a short assistant note, so the next input reads as a new turn rather than
    as more of the old one. The current run's own open calls are left alone: the loop is
    about to answer them. Messages seeded without a run (run id "") get neither.
    """
    context: list[ChatMessage] = []
    open_calls: list[ToolCall] = []
    previous: Any = None

    def close(ended_run: str) -> None:
        if ended_run != run_id:
            context.extend(ChatMessage("tool", NO_RESULT, tool_call_id=call.id) for call in open_calls)
        open_calls.clear()

    for row in rows:
        message = row.chat
        if message.role == "tool":
            open_calls[:] = [call for call in open_calls if call.id != message.tool_call_id]
        elif previous is not None:
            if open_calls:  # the common message closes nothing: this loop runs over the whole conversation
                close(previous.run_id)
            if previous.run_id not in ("", row.run_id) and not _is_answer(previous):
                context.append(ChatMessage("assistant", NO_ANSWER))
        context.append(message)
        if message.role == "assistant" and message.tool_calls:
            open_calls.extend(message.tool_calls)
        previous = row
    if open_calls:
        close(previous.run_id)
    return context


def _is_answer(row: StoredMessage) -> bool:
    return row.role == "assistant" and not row.chat.tool_calls


def current_run(rows: Sequence[StoredMessage], run_id: str) -> Sequence[StoredMessage]:
    """The run's own messages: the conversation's tail, since a session has one active run
    and a waiting run keeps its place (so a run never has to scan the whole conversation)."""
    start = len(rows)
    while start and rows[start - 1].run_id == run_id:
        start -= 1
    return rows[start:]


def unresolved_calls(rows: Sequence[StoredMessage], run_id: str) -> list[ToolCall]:
    """Tool calls of the run's latest assistant step that have no result yet."""
    own = current_run(rows, run_id)
    last_step = next((i for i in range(len(own) - 1, -1, -1) if own[i].is_step), None)
    if last_step is None:
        return []
    answered = {row.chat.tool_call_id for row in own[last_step + 1 :] if row.role == "tool"}
    return [call for call in own[last_step].chat.tool_calls if call.id not in answered]


def steps_taken(rows: Sequence[StoredMessage], run_id: str) -> int:
    return sum(1 for row in current_run(rows, run_id) if row.is_step)
