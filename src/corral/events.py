"""Event records: what a run tells the world, in the order it happened."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.clock import utcnow
from corral.types import TERMINAL_EVENT_TYPES, EventType


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event before it is committed; the writer gives it its sequence number."""

    session_id: str
    type: EventType
    run_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True)
class Event:
    """A committed event: ``seq`` is gap-free and increasing within its session."""

    session_id: str
    seq: int
    type: str
    run_id: str | None
    data: dict[str, Any]
    ts: datetime
    # ``payload_json``'s text and ``sse_frame``'s bytes once made: caches, not part of the event.
    _json: str | None = field(default=None, compare=False, repr=False)
    _frame: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES

    def payload(self) -> dict[str, Any]:
        """The JSON body clients see: the event's own data plus its envelope."""
        return {
            **self.data,
            "seq": self.seq,
            "type": self.type,
            "run_id": self.run_id,
            "session_id": self.session_id,
            "ts": self.ts.isoformat(),
        }

    def payload_json(self) -> str:
        """``payload()`` as JSON, serialised once however many streams send the event (a
        thousand observers of one session would otherwise serialise it a thousand times)."""
        text = self._json
        if text is None:
            text = json.dumps(self.payload())
            object.__setattr__(self, "_json", text)  # frozen: filling the cache changes no field
        return text

    def sse_frame(self) -> bytes:
        """The event as one Server-Sent Events frame (``id:`` = seq, ``event:`` = type, ``data:``
        = ``payload_json()``), made once however many streams send it.

        Three fixed lines: a type is one of ours and the JSON is one line (``json.dumps`` escapes
        line breaks), so this is byte for byte what sse-starlette's ``ServerSentEvent`` writes,
        without its per-line splitting and checks.
        """
        frame = self._frame
        if frame is None:
            frame = f"id: {self.seq}\r\nevent: {self.type}\r\ndata: {self.payload_json()}\r\n\r\n".encode()
            object.__setattr__(self, "_frame", frame)  # frozen: filling the cache changes no field
        return frame

    def row(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "seq": self.seq,
            "type": self.type,
            "run_id": self.run_id,
            "data": self.data,
            "ts": self.ts,
        }

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(
            session_id=row.session_id,
            seq=row.seq,
            type=row.type,
            run_id=row.run_id,
            data=row.data,
            ts=row.ts,
        )
