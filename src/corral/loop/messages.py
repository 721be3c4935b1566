"""Conversion between stored message rows and the model's context."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from corral.providers.base import ChatMessage, ToolCall
from corral.store.tables import utcnow


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


def to_chat(row: Any) -> ChatMessage:
    calls = tuple(ToolCall.from_json(c) for c in (row.tool_calls or ()))
    return ChatMessage(row.role, row.content, calls, row.tool_call_id)


def unresolved_calls(rows: Sequence[Any], run_id: str) -> list[ToolCall]:
    """Tool calls of the run's latest assistant step that have no result yet."""
    last_step = None
    for index, row in enumerate(rows):
        if row.run_id == run_id and row.role == "assistant" and row.tool_calls:
            last_step = index
    if last_step is None:
        return []
    answered = {row.tool_call_id for row in rows[last_step + 1 :] if row.role == "tool"}
    calls = [ToolCall.from_json(c) for c in rows[last_step].tool_calls]
    return [call for call in calls if call.id not in answered]


def steps_taken(rows: Sequence[Any], run_id: str) -> int:
    return sum(1 for row in rows if row.run_id == run_id and row.role == "assistant" and row.tool_calls)
