"""The repair rule: a transition whose write fails is not undone in memory, it is finished.

A transition (a run begins, a run ends) changes memory at once and returns the writes
still to do. If the write fails, memory is already past the point of no return (the run
has ended; its inputs were handed out), so the kernel does not pretend otherwise: it
holds the session where it is (the next run does not start; new inputs get 503 with
Retry-After) and writes again until the store takes it:

- a store that is unavailable (unreachable, locked, full) gets the same write again,
  with backoff, for as long as it takes: when it comes back, nothing is lost;
- a write the store rejects outright (a value it cannot hold, a broken rule) would fail
  forever: after ``write_attempts`` tries the transition's simpler form is written
  instead (for a run's end: failed, without its output), so the session moves on.

Acceptance needs no repair of this kind: until its write commits nothing was accepted,
so a failed acceptance is taken back out of memory and the client told 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from corral.errors import StoreConflict, StoreRejected, StoreUnavailable
from corral.kernel.config import KernelConfig
from corral.kernel.sessions import SessionRuntime
from corral.records import Writes

log = logging.getLogger(__name__)

# What a write that keeps failing this way will keep doing: worth a simpler form.
PERMANENT = (StoreConflict, StoreRejected)
# How long a refused client is told to wait before trying again.
RETRY_AFTER_S = 1.0


def refused_while_repairing(runtime: SessionRuntime) -> StoreUnavailable:
    return StoreUnavailable(f"session {runtime.id} is waiting for the store to take a write; try again shortly",
                            retry_after=RETRY_AFTER_S)


async def write_until_committed(
    submit: Callable[[Writes], asyncio.Future[Any]],
    writes: Writes,
    runtime: SessionRuntime,
    config: KernelConfig,
    *,
    what: str,
    simpler: Writes | None = None,
    first: asyncio.Future[Any] | None = None,
) -> Writes | None:
    """Submit ``writes`` until it commits; returns what committed (``writes``, or ``simpler``
    once the store rejected ``writes`` for good), or None if it was rejected and there is no
    simpler form. ``first`` is the first attempt when the caller submitted it already (in the
    step of its transition, so it keeps its place in the store's order). While the write is
    failing, ``runtime.repairing`` refuses the session's new inputs."""
    attempt, rejected, delay = 0, 0, config.write_retry_min_s
    try:
        while True:
            try:
                await (first if first is not None else submit(writes))
                return writes
            except (StoreUnavailable, *PERMANENT) as exc:
                first = None
                attempt += 1
                if attempt == 1:
                    runtime.repairing += 1
                if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8...: a long outage (a full disk) does not flood the log
                    log.warning("%s: write failed (attempt %d), repairing: %s", what, attempt, exc)
                if isinstance(exc, PERMANENT):
                    rejected += 1
                    if rejected >= config.write_attempts:
                        if simpler is None or writes is simpler:
                            return None
                        writes, rejected = simpler, 0
                        continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, config.write_retry_max_s)
    finally:
        if attempt:
            runtime.repairing -= 1
