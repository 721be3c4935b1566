"""Recent conversations in memory, so a run reads only the messages that are new.

Every run builds its model context from the whole stored conversation. Read from scratch,
that cost grew with the conversation: a reader hop that fetched every row, and with the
event loop busy, sqlite3 takes the GIL back after each row's step, so the read's wall time
grew with rows times load (docs/benchmarks.md). Kept here, a session's conversation is
read once; after that, the messages this process commits for it are appended as they
commit (``committed``, told by the writer with their ids before the commit's writes
resolve), so a run usually reads nothing: the reader hop for its own user message was a
third of a short turn's server time (docs/benchmarks.md, per-turn).

Why this is exact: this process is the only writer of a session's messages while it owns
the session (DESIGN.md section 6), message ids grow in commit order (one writer), every
message is inserted by the writer, which hands back each batch's messages in commit order,
and the writes that change which stored messages count are this process's own: a roll-back
(``ops.RollBack``, written by the kernel) and a compaction (written by the step loop). Each
calls ``forget`` as it submits the write, so the session's next read starts from scratch.
A commit that lands while the session is being read may or may not be in what the read
returns, so that read's result is kept as not *current*: the next run reads the messages
after it, as every run did before.

Bounded: at most ``capacity`` sessions, least recently used first out; an idle session
costs nothing once evicted, and a miss is only a full read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corral.kernel.ports import KernelStore
from corral.lru import Lru
from corral.providers.base import ChatMessage, ToolCall

log = logging.getLogger(__name__)


@dataclass
class _Conversation:
    compaction: Any  # the latest compaction row, or None
    rows: list[StoredMessage]  # the live messages after it, in id order
    # Every message committed for the session since is in ``rows``: a run reads nothing.
    current: bool = True

    @property
    def last_id(self) -> int:
        if self.rows:
            return int(self.rows[-1].id)
        return int(self.compaction.through_message_id) if self.compaction is not None else 0


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored message as the step loop reads it: its id, its run and its model form.

    Every run rebuilds its context from the whole conversation; converted once, when first
    read (``kernel.conversations`` keeps these between runs), a message costs a run nothing
    more than a look.
    """

    id: int
    run_id: str
    chat: ChatMessage  # the role, content and tool calls, in the form the model takes

    @classmethod
    def from_row(cls, row: Any) -> StoredMessage:
        calls = tuple(ToolCall.from_json(c) for c in (row.tool_calls or ()))
        return cls(row.id, row.run_id, ChatMessage(row.role, row.content, calls, row.tool_call_id))

    @classmethod
    def from_committed(cls, row: dict[str, Any]) -> StoredMessage:
        """A row the writer committed, as reading it back would give it (``Store.on_messages``)."""
        calls = tuple(ToolCall.from_json(c) for c in (row["tool_calls"] or ()))
        return cls(row["id"], row["run_id"], ChatMessage(row["role"], row["content"], calls, row["tool_call_id"]))

    @property
    def role(self) -> str:
        return self.chat.role

    @property
    def content(self) -> str:
        return self.chat.content

    @property
    def is_step(self) -> bool:
        """An assistant message that called tools: one step of its run."""
        return self.role == "assistant" and bool(self.chat.tool_calls)



def _stored(rows: Sequence[Any]) -> list[StoredMessage]:
    return [StoredMessage.from_row(row) for row in rows]


class Conversations:
    """The latest compaction and live messages of recently active sessions."""

    def __init__(self, store: KernelStore, capacity: int = 1000):
        self._store = store
        self._entries: Lru[str, _Conversation] = Lru(capacity)
        self._forgotten = 0  # counts forget() calls: a read that overlapped one keeps nothing
        # Sessions being read now (how many reads each), and those a commit touched meanwhile.
        self._reading: dict[str, int] = {}
        self._overlapped: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.unread = 0  # runs served from memory alone

    def __repr__(self) -> str:
        return f"<Conversations {len(self._entries)}/{self._entries.capacity} hits={self.hits} misses={self.misses}>"

    def __len__(self) -> int:
        return len(self._entries)

    async def read(self, session_id: str) -> tuple[Any, Sequence[StoredMessage]]:
        """The latest compaction and the messages it does not summarise (``repo.conversation``):
        from memory when every commit since was seen, else in one hop that fetches only the
        rows that are new."""
        known = self._entries.get(session_id)
        if known is not None and known.current:
            self.hits += 1
            self.unread += 1
            return known.compaction, known.rows
        epoch = self._forgotten
        self._reading[session_id] = self._reading.get(session_id, 0) + 1
        try:
            if known is None:
                self.misses += 1
                compaction, rows = await self._store.conversation(session_id)
                entry = _Conversation(compaction, _stored(rows))
            else:
                self.hits += 1
                fresh = await self._store.messages_after(session_id, known.last_id)
                entry = _Conversation(known.compaction, known.rows + _stored(fresh))
        finally:
            left = self._reading.pop(session_id) - 1
            if left:
                self._reading[session_id] = left
            entry_overlapped = session_id in self._overlapped
            if not left:
                self._overlapped.discard(session_id)
        entry.current = not entry_overlapped
        if self._forgotten == epoch:  # nothing was forgotten while we read (else keep nothing)
            self._entries.put(session_id, entry)
        return entry.compaction, entry.rows

    def committed(self, messages: list[dict[str, Any]] | None) -> None:
        """Messages the writer just committed (rows with their ids, in id order): appended to
        their sessions' conversations, which stay current. Rolled-back rows do not count. If
        they could not be told (None) or following them goes wrong, nothing kept is trusted:
        every session is read again."""
        if messages is not None:
            try:
                self._append(messages)
                return
            except Exception:
                log.exception("could not follow committed messages")
        log.warning("a commit's messages were not followed: every conversation is read again")
        self._entries.clear()
        self._forgotten += 1  # and a read under way keeps nothing

    def _append(self, messages: list[dict[str, Any]]) -> None:
        by_session: dict[str, list[dict[str, Any]]] = {}
        for row in messages:
            by_session.setdefault(row["session_id"], []).append(row)
        for session_id, rows in by_session.items():
            if session_id in self._reading:
                self._overlapped.add(session_id)
            known = self._entries.get(session_id)
            if known is None or not known.current:
                continue
            if rows[0]["id"] <= known.last_id:  # ids out of order: not what this cache can follow
                known.current = False
                continue
            live = [StoredMessage.from_committed(row) for row in rows if not row["rolled_back"]]
            # A new list: a run that already took the old one is not disturbed.
            self._entries.put(session_id, _Conversation(known.compaction, known.rows + live))

    def forget(self, session_id: str) -> None:
        """What counts of the session's messages is about to change (a roll-back, a compaction)."""
        self._entries.pop(session_id)
        self._forgotten += 1
