"""Context compaction: when a session's history outgrows its agent's token budget, the model
summarises the older turns and the summary stands in for them from then on.

Only the context shrinks: the messages stay in the store (the API and the audit trail see
them all). The cut falls where one run's messages end and the next one's begin, so a tool
call is never separated from its result, and the current run is never summarised.
Tokens are estimated (about four characters each): the budget is a guard, not a bill.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from corral.kernel.conversations import StoredMessage
from corral.loop.messages import build_context
from corral.providers.base import ChatMessage

SUMMARY_INSTRUCTIONS = (
    "You are compacting a conversation so it fits in a limited context. Summarise the conversation "
    "below for your own later use: keep the user's goals, facts, names, decisions, open questions "
    "and the results of tool calls that still matter. Write plain prose, no preamble."
)
SUMMARY_HEADER = "Summary of the earlier conversation (older messages were compacted):\n"
# After compacting, the kept messages should use at most this share of the budget,
# so that compaction is rare rather than happening before every call.
KEEP_SHARE = 0.5


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    chars = 0
    for message in messages:
        chars += len(message.content) + 16  # the role and framing cost a few tokens each
        chars += sum(len(call.name) + len(json.dumps(call.arguments)) for call in message.tool_calls)
    return chars // 4


def summary_message(summary: str) -> ChatMessage:
    return ChatMessage("system", SUMMARY_HEADER + summary)


@dataclass(frozen=True)
class Cut:
    """Summarise ``rows[:index]``: they end with the message whose id is ``through_message_id``."""

    index: int
    through_message_id: int


def choose_cut(rows: Sequence[StoredMessage], run_id: str, budget: int, fixed: Sequence[ChatMessage]) -> Cut | None:
    """Where to cut, or None when there is nothing older than the current run to summarise.

    ``fixed`` is what every context carries (the system prompt and the new summary's
    share): the kept rows get what the budget leaves after it.
    """
    current = next((i for i, row in enumerate(rows) if row.run_id == run_id), len(rows))
    boundaries = [i for i in range(1, current + 1) if i == current or rows[i].run_id != rows[i - 1].run_id]
    if not boundaries:
        return None
    allowance = KEEP_SHARE * budget - estimate_tokens(fixed)
    for index in boundaries:  # the earliest cut that leaves enough room keeps the most context
        if estimate_tokens(build_context(rows[index:], run_id)) <= allowance:
            return Cut(index, rows[index - 1].id)
    return Cut(current, rows[current - 1].id)  # as far as it may go: up to the current run


def summary_request(previous: str | None, rows: Sequence[StoredMessage]) -> list[ChatMessage]:
    messages = [ChatMessage("system", SUMMARY_INSTRUCTIONS)]
    if previous:
        messages.append(summary_message(previous))
    messages += build_context(rows, "")
    messages.append(ChatMessage("user", "Summarise the conversation so far, as instructed."))
    return messages
