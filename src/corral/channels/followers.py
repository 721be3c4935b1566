"""Following the runs a channel owes replies for: each run's events become outbox rows.

One task per run, in the channel's task group. It reads the run's events (its backlog from
the store, then live), keeps a ``Reply``, and writes rows: a new chunk at once, a changed one
no more often than the platform's edit interval, approvals at once; a typing indicator while
the run works and nothing is shown yet. The run's last rows and its ``channel_runs`` row's
close commit together, so a restart follows again exactly the runs not yet fully queued.
A run the kernel moved a run's inputs to (a steer its run ended before taking, a restart's
re-queue) is followed in the same chat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral.channels.config import ChannelSpec
from corral.channels.errors import PlatformError
from corral.channels.outbox import Outbox
from corral.channels.platforms.base import Platform
from corral.channels.reply import Reply
from corral.clock import utcnow
from corral.store import channels as rows

if TYPE_CHECKING:
    from corral.kernel import Kernel

log = logging.getLogger(__name__)

TYPING_EVERY_S = 4.5  # Telegram shows "typing…" for 5 s


class Followers:
    def __init__(self, kernel: Kernel, spec: ChannelSpec, outbox: Outbox, platform: Platform,
                 group: asyncio.TaskGroup, clock: Callable[[], float]):
        self.kernel = kernel
        self.spec = spec
        self.outbox = outbox
        self.platform = platform
        self._group = group
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.replies = 0

    def __repr__(self) -> str:
        return f"<Followers {self.spec.name} following={len(self._tasks)} replied={self.replies}>"

    def __len__(self) -> int:
        return len(self._tasks)

    def follow(self, run: dict[str, Any], *, replayed: bool = False) -> None:
        """Follow ``run`` (a ``channel_runs`` row) unless it is followed already."""
        run_id = run["run_id"]
        if run_id in self._tasks:
            return
        self._tasks[run_id] = self._group.create_task(self._follow(run, replayed), name=f"reply:{run_id}")

    async def resume(self) -> int:
        """Follow every run still owed a reply (after a start); how many."""
        owed = await self.kernel.store.read(rows.open_runs, self.spec.name)
        for row in owed:
            self.follow(dict(row._mapping), replayed=True)
        return len(owed)

    async def _follow(self, run: dict[str, Any], replayed: bool) -> None:
        try:
            reply = Reply(run["run_id"], run["chat_id"], run["thread_id"], run["reply_to"], self.spec.limits.text_limit,
                          replayed=replayed)
            if await self._stream(reply, run["session_id"]):
                await self.outbox.put(reply.rows() + reply.take_urgent(),
                                      also=lambda conn: rows.close_run(conn, reply.run_id))
                self.replies += 1
                await self._adopt(run)
        finally:
            self._tasks.pop(run["run_id"], None)

    async def _stream(self, reply: Reply, session_id: str) -> bool:
        """Write the reply's rows as the run goes; True once its terminal event is taken (False:
        the kernel stops first, and the run stays owed)."""
        changed = asyncio.Event()
        version = 0

        async def read() -> None:
            nonlocal version
            batches = self.kernel.hub.observe_batches(self.kernel.store, session_id, run_id=reply.run_id,
                                                      stop=self.kernel.stopping)
            async for batch in batches:
                for event in batch:
                    reply.take(event)
                version += 1
                changed.set()
            changed.set()

        interval = self.spec.limits.edit_interval_s
        flushed, last_flush, typed = 0, float("-inf"), float("-inf")
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(read())
            while True:
                now = self._clock()
                waits = []
                if version != flushed:
                    waits.append(last_flush + interval - now)
                if reply.started and not reply.shown:
                    waits.append(typed + TYPING_EVERY_S - now)
                await _wait(changed, min(waits) if waits else None)
                changed.clear()
                urgent = reply.take_urgent()
                if urgent:
                    await self.outbox.put(urgent)
                if reply.ended or reader.done():
                    break
                now = self._clock()
                if reply.started and not reply.shown and now >= typed + TYPING_EVERY_S:
                    typed = now
                    await self._typing(reply)
                if version != flushed and now >= last_flush + interval:
                    flushed, last_flush = version, now
                    fresh = reply.rows()
                    if fresh:
                        await self.outbox.put(fresh)
            reader.cancel()
        return reply.ended

    async def _typing(self, reply: Reply) -> None:
        if not self.outbox.take_spare():
            return  # the global limit is busy with replies: they matter more
        try:
            async with asyncio.timeout(self.spec.request_timeout_s):
                await self.platform.typing(reply.chat_id, reply.thread_id)
        except (PlatformError, TimeoutError) as exc:
            log.debug("channel %s: typing indicator failed: %s", self.spec.name, exc)

    async def _adopt(self, run: dict[str, Any]) -> None:
        """Follow, in the same chat, the runs of the session still to come (the inputs of a run
        that ended before taking them were moved to one)."""
        live = self.kernel.sessions.live(run["session_id"])
        if live is None:
            return
        for run_id in list(live.handles):
            if run_id in self._tasks:
                continue
            row = {**run, "run_id": run_id, "created_at": utcnow()}
            await self.kernel.store.write(lambda conn, row=row: rows.add_run(conn, row))  # type: ignore[misc]
            self.follow(row)


async def _wait(event: asyncio.Event, within: float | None) -> None:
    """Until ``event`` is set, for at most ``within`` seconds (None: no limit)."""
    if within is None:
        await event.wait()
        return
    if within <= 0:
        return
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        pass
