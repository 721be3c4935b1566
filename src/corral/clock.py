"""Wall-clock time as Corral records it: timezone-aware UTC, so every layer agrees.

It lives at the bottom of the package (beside ``types``) because the kernel, the loop,
services and the store all stamp records, and none of them should import another's
module just for the time.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
