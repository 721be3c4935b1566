"""Giving back to the system the memory a crowd of observers leaves behind.

A stalled observer holds up to its cap of bytes in its connection's write buffer (issue 17), so
two hundred of them hold tens of MB. When they leave, the buffers are freed to the C allocator,
which keeps the pages for reuse: the process stays at its peak size long after the crowd left.
Once observers have left in numbers and a moment has passed (their connections are closed by
then), ``FreedMemory`` asks glibc to return free pages (``malloc_trim``), which takes a
millisecond or two. Where the C library is not glibc, it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# Observers that leave before memory is given back, and the wait after the last of them.
LEFT_BEFORE_TRIM = 32
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
    """Counts observers leaving; after ``LEFT_BEFORE_TRIM`` of them, trims once ``settle_s`` later."""

    def __init__(self, trim: Callable[[int], int] | None = None, *, settle_s: float = SETTLE_S):
        self._trim = trim if trim is not None else _glibc_trim()
        self.settle_s = settle_s
        self._left = 0
        self._timer: asyncio.TimerHandle | None = None
        self.trims = 0

    def left(self) -> None:
        """An observer left (its connection closes now or soon)."""
        self._left += 1
        if self._left >= LEFT_BEFORE_TRIM and self._timer is None and self._trim is not None:
            self._timer = asyncio.get_running_loop().call_later(self.settle_s, self._give_back)

    def _give_back(self) -> None:
        self._timer = None
        self._left = 0
        self.trims += 1
        assert self._trim is not None
        if not self._trim(0):
            log.debug("malloc_trim found no memory to give back")
