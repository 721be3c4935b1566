"""Giving back to the system the memory a crowd of observers leaves behind.

A stalled observer holds up to its cap of bytes in its connection's write buffer (issue 17), so
two hundred of them hold tens of MB. When they leave, the buffers are freed to the C allocator,
which keeps the pages for reuse: the process stays at its peak size long after the crowd left.
``FreedMemory`` follows the number of observers; once it has fallen by half of its peak, and by
at least ``CROWD``, it waits a moment for the rest of the crowd to go (their connections close
meanwhile) and asks glibc to return free pages (``malloc_trim``, a millisecond or two). Streams
that come and go all the time, one a turn, leave the number where it is and trigger nothing.
Where the C library is not glibc, it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# How many observers must have left since the peak, and the wait before the trim.
CROWD = 32
SETTLE_S = 1.0


def _glibc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to ask
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class FreedMemory:
    """Told the number of observers as it changes; trims ``settle_s`` after a crowd has left."""

    def __init__(self, trim: Callable[[int], int] | None = None, *, settle_s: float = SETTLE_S):
        self._trim = trim if trim is not None else _glibc_trim()
        self.settle_s = settle_s
        self._count = 0
        self._peak = 0  # the most observers since the last trim
        self._timer: asyncio.TimerHandle | None = None
        self.trims = 0

    def observers(self, count: int) -> None:
        """There are ``count`` observers now."""
        self._count = count
        self._peak = max(self._peak, count)
        crowd_left = self._peak - count >= CROWD and count <= self._peak // 2
        if crowd_left and self._timer is None and self._trim is not None:
            self._timer = asyncio.get_running_loop().call_later(self.settle_s, self._give_back)

    def _give_back(self) -> None:
        self._timer = None
        self._peak = self._count
        self.trims += 1
        assert self._trim is not None
        if not self._trim(0):
            log.debug("malloc_trim found no memory to give back")
