"""Other people's load: CPU used on this machine by processes outside the bench's own tree.

On a 2-core machine, a test suite or a build running beside the bench takes most of a core
from the server or its generator, and the figures drop with no sign of why (we saw the no-op
ceiling halve that way). So every scenario runs under this monitor: twice a second it reads
every process's CPU time from /proc and adds up what processes not descended from the bench
used. A scenario with more than a fifth of a core of foreign load is flagged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
FLAG_CORES = 0.2


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system ticks) for every process that can be read now."""
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        found[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def _ours(processes: dict[int, tuple[int, int]], root: int) -> set[int]:
    ours = {root}
    changed = True
    while changed:
        changed = False
        for pid, (parent, _) in processes.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return ours


class ForeignLoad:
    """Samples in a task while a scenario runs; ``result()`` gives mean and peak foreign cores."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ForeignLoad:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        root = os.getpid()
        before, at = await asyncio.to_thread(_processes), time.monotonic()
        while True:
            await asyncio.sleep(self.every_s)
            now, when = await asyncio.to_thread(_processes), time.monotonic()
            ours = _ours(now, root)
            ticks = sum(max(0, cpu - before[pid][1]) for pid, (_, cpu) in now.items()
                        if pid not in ours and pid in before)
            self.samples.append(ticks / TICKS / (when - at))
            before, at = now, when

    def result(self) -> dict[str, Any]:
        if not self.samples:
            return {"mean_cores": 0.0, "max_cores": 0.0}
        return {"mean_cores": sum(self.samples) / len(self.samples), "max_cores": max(self.samples)}
