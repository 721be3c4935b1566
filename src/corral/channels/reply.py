"""One run's reply in one chat, rebuilt from the run's events: pure, no I/O.

The reply is the text of the run's assistant steps (streamed deltas, or a step's completed
message), split at the platform's limit (``split``). ``rows`` says what the outbox must get
for the chat to show it: a send per new chunk, an edit per chunk whose text changed. Keys
make a rebuilt reply's rows the same rows: chunk ``i`` of run ``R`` is sent as ``R:c{i}``
and finished as ``R:c{i}:f``, so after a restart the rows already written are recognised
and the chat sees each chunk once. A streaming edit has a key of its own (``R:c{i}:e{n}-*``)
and is ``interim``: a later edit of the same message replaces it unsent.

Approvals become their own messages with two buttons whose data is
``ap:{run_id}:{call hash}:{y|n}`` (under Telegram's 64 bytes), edited with the outcome once
decided.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from corral.channels.platforms.base import Delivery
from corral.channels.split import split_reply
from corral.events import Event
from corral.types import EventType, RunStatus

APPROVE, DENY = "y", "n"
OUTCOMES = {"approve": "approved", "deny": "denied"}


def call_hash(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:10]


def button_data(run_id: str, call_id: str, decision: str) -> str:
    return f"ap:{run_id}:{call_hash(call_id)}:{decision}"


def parse_button(data: str) -> tuple[str, str, str] | None:
    """(run id, call hash, y|n) of an approval button, or None for any other data."""
    parts = data.split(":")
    if len(parts) != 4 or parts[0] != "ap" or parts[3] not in (APPROVE, DENY):
        return None
    return parts[1], parts[2], parts[3]


@dataclass
class Approval:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    outcome: str | None = None


@dataclass
class Reply:
    run_id: str
    chat_id: str
    thread_id: str | None
    reply_to: str | None
    limit: int
    # Rebuilt after a restart: what the chat shows is unknown, so the finish edits every chunk
    # (an edit to the same text costs a call and changes nothing).
    replayed: bool = False
    steps: list[str] = field(default_factory=lambda: [""])
    status: RunStatus | None = None
    error: str | None = None
    started: bool = False
    approvals: dict[str, Approval] = field(default_factory=dict)
    # What each chunk's rows so far say (the chat shows it once they are sent).
    shown: list[str] = field(default_factory=list)
    # Approval messages and their outcomes, written at once (not throttled like text).
    urgent: list[Delivery] = field(default_factory=list)
    _edits: int = 0
    _tag: str = field(default_factory=lambda: secrets.token_hex(3))

    def __repr__(self) -> str:
        state = self.status.value if self.status else ("running" if self.started else "queued")
        return f"<Reply {self.run_id} {state} chars={len(self.text())} chunks={len(self.shown)}>"

    @property
    def ended(self) -> bool:
        return self.status is not None

    def take(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind == EventType.RUN_STARTED:
            self.started = True
        elif kind == EventType.MESSAGE_DELTA:
            self.steps[-1] += str(data.get("text", ""))
        elif kind == EventType.MESSAGE_COMPLETED and data.get("role") == "assistant":
            content = data.get("content")
            if isinstance(content, str) and content:
                self.steps[-1] = content
            if data.get("tool_calls"):
                self.steps.append("")
        elif kind == EventType.APPROVAL_REQUESTED:
            call_id = str(data["call_id"])
            approval = Approval(call_id, str(data.get("tool", "")), dict(data.get("arguments") or {}))
            self.approvals[call_id] = approval
            self.urgent.append(self._row("send", f"{self.run_id}:ap:{call_hash(call_id)}", _question(approval),
                                         buttons=[["Approve", button_data(self.run_id, call_id, APPROVE)],
                                                  ["Deny", button_data(self.run_id, call_id, DENY)]]))
        elif kind == EventType.APPROVAL_RESOLVED:
            resolved = self.approvals.get(str(data.get("call_id")))
            if resolved is not None:
                approval = resolved
                approval.outcome = OUTCOMES.get(str(data.get("decision")), "decided")
                key = f"{self.run_id}:ap:{call_hash(approval.call_id)}"
                self.urgent.append(self._row("edit", f"{key}:done", _question(approval), target=key, final=True))
        elif event.is_terminal:
            self.status = RunStatus(str(data.get("status", kind.removeprefix("run."))))
            error = data.get("error")
            self.error = str(error.get("message")) if isinstance(error, dict) and error.get("message") else None

    def text(self) -> str:
        body = "\n\n".join(step.strip() for step in self.steps if step.strip())
        if self.status is None:
            return body
        note = {RunStatus.CANCELLED: "⏹ stopped", RunStatus.INTERRUPTED: "⏸ interrupted",
                RunStatus.FAILED: f"⚠ failed: {self.error or 'the run failed'}"}.get(self.status)
        if note is None:
            return body or "(no answer)"
        return f"{body}\n\n{note}" if body else note

    def take_urgent(self) -> list[Delivery]:
        urgent, self.urgent = self.urgent, []
        return urgent

    def rows(self) -> list[Delivery]:
        """What the chat needs now: a send for each new chunk, an edit for each one changed. At
        the end (the terminal event taken), each chunk that changed, and the last one always, is
        finished under its final key (the outbox skips an edit that would change nothing)."""
        text = self.text()
        if not text:
            return []
        chunks = split_reply(text, self.limit)
        out: list[Delivery] = []
        final = self.ended
        for index, chunk in enumerate(chunks):
            key = f"{self.run_id}:c{index}"
            last = index == len(chunks) - 1
            if index >= len(self.shown):
                out.append(self._row("send", key, chunk, part=index, final=final and last or None))
                self.shown.append(chunk)
                if final and self.replayed:
                    out.append(self._row("edit", f"{key}:f", chunk, target=key, part=index, final=last or None))
            elif final and (chunk != self.shown[index] or self.replayed or last):
                out.append(self._row("edit", f"{key}:f", chunk, target=key, part=index, final=last or None))
                self.shown[index] = chunk
            elif chunk != self.shown[index]:
                self._edits += 1
                out.append(self._row("edit", f"{key}:e{self._edits}-{self._tag}", chunk, target=key, part=index,
                                     interim=True))
                self.shown[index] = chunk
        return out

    def _row(self, kind: str, key: str, text: str, *, target: str | None = None, **extra: Any) -> Delivery:
        return Delivery(key, self.chat_id, self.thread_id, kind, text, target,
                        {"reply_to": self.reply_to, **{k: v for k, v in extra.items() if v is not None}})


def _question(approval: Approval) -> str:
    arguments = ", ".join(f"{k}={v!r}" for k, v in approval.arguments.items())
    text = f"Allow {approval.tool}({arguments[:500]})?"
    if approval.outcome is not None:
        text += f" — {approval.outcome}"
    return text
