"""Whether the store takes writes: what its writer learnt from its last commit.

Nothing here asks the database anything. The writer tells ``WriteHealth`` the outcome of
every commit it attempts (a committed batch, or a unit that failed), so readiness costs a
read of two attributes. When the last attempt failed and nothing else is writing, the
kernel's store watch probes with a small write of its own (``Store.probe``), with backoff,
until one commits; that is how "space returned" is learnt without any client writing.

Only failures that say the store cannot write just now (unreachable, locked, full, a node
fenced) count: a unit refused for its own data (a broken uniqueness rule, a value too large)
says nothing about the store, and neither does the writer being closed at shutdown.
"""

from __future__ import annotations

import asyncio
import re
import time

# A reason is shown to anyone who asks ``/readyz``: no URL (it may carry a password), and short.
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
REASON_CHARS = 200


def public_reason(text: str) -> str:
    """A driver's message as readiness may show it: URLs dropped, one line, bounded."""
    line = _URL.sub("<url>", text.splitlines()[0] if text else "").strip()
    return line[:REASON_CHARS] or "unknown error"


class WriteHealth:
    """The outcome of the store's last write attempt. Touched on the event loop only."""

    def __init__(self) -> None:
        # None until the first attempt's outcome is known.
        self.writable: bool | None = None
        self.reason: str | None = None
        # Consecutive failed attempts; and when the last attempt (of any outcome) ended.
        self.failures = 0
        self.last_attempt = 0.0
        # Set while the last attempt failed: what the store watch waits for.
        self.failing = asyncio.Event()

    def __repr__(self) -> str:
        state = {None: "unknown", True: "writable"}.get(self.writable, f"unwritable ({self.reason})")
        return f"<WriteHealth {state}>"

    def committed(self) -> None:
        self.writable, self.reason, self.failures = True, None, 0
        self.last_attempt = time.monotonic()
        self.failing.clear()

    def failed(self, reason: str) -> None:
        self.writable, self.reason = False, public_reason(reason)
        self.failures += 1
        self.last_attempt = time.monotonic()
        self.failing.set()

    @property
    def state(self) -> str:
        """``ok``, ``unwritable`` or ``unknown`` (no write tried yet)."""
        return {None: "unknown", True: "ok"}.get(self.writable, "unwritable")
