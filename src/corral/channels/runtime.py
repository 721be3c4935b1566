"""One channel's runtime: a supervised service of its own inside ``corral serve``.

Each attempt builds the platform's client (reading its secrets), checks it with the platform
(``start``), loads the outbox's pending rows, resumes the replies still owed, and then hears
the platform, sends the outbox and follows runs, all in one task group: the attempt's scope.
Anything that escapes it (a token the platform refuses, a bug, a store that stops taking
writes) ends that attempt only; the channel backs off (1 s doubling to 5 min, reset after a
healthy minute, or at once by ``restart``) and tries again, with its state and last error
shown at ``GET /v1/channels``. A platform that answers 5xx or hangs while polling is retried
by the client itself, with the state ``backing_off`` meanwhile, without tearing down replies
in progress. Nothing here is shared with another channel but the store and the kernel, so a
channel whose platform is dead costs the others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from corral.channels.chats import Chats, Taken
from corral.channels.config import ChannelSpec
from corral.channels.errors import AuthRejected, ChannelError, ChannelNotRunning, MissingSecret, NotBuilt, Transient
from corral.channels.followers import Followers
from corral.channels.outbox import Outbox
from corral.channels.platforms import Inbound, Platform, platform_for
from corral.clock import utcnow
from corral.store import channels as rows

if TYPE_CHECKING:
    from corral.kernel import Kernel

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 300.0
HEALTHY_AFTER_S = 60.0
PRUNE_EVERY_S = 3600.0
KEEP_DAYS = 7.0

PlatformFactory = Callable[[ChannelSpec], Platform]
# Failures another attempt will not fix by itself: shown as ``failed`` (still retried, slowly).
PERMANENT = (MissingSecret, AuthRejected, NotBuilt, LookupError)


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    FAILED = "failed"  # an error a retry will not fix by itself (a missing secret, a refused token); retried slowly
    STOPPED = "stopped"


class _Restart(Exception):
    """``restart()`` asked for a fresh attempt."""


class ChannelRuntime:
    def __init__(self, kernel: Kernel, spec: ChannelSpec, *, platform_factory: PlatformFactory = platform_for):
        self.kernel = kernel
        self.spec = spec
        self._factory = platform_factory
        self._state = State.STARTING
        self._state_waiters: list[tuple[frozenset[State], asyncio.Future[None]]] = []
        self.last_error: str | None = None
        self.error_at: datetime | None = None
        self.next_attempt_at: datetime | None = None
        self.started_at: datetime | None = None
        self.attempts = 0
        self.outbox: Outbox | None = None
        self.chats: Chats | None = None
        self.followers: Followers | None = None
        self._restart = asyncio.Event()
        self._running = asyncio.Event()  # set while an attempt is up (tests and pushes wait on it)
        self._counts: dict[str, int] = {}  # the chats' counts of earlier attempts
        self._sent_before = 0
        self._failed_before = 0

    def __repr__(self) -> str:
        return f"<ChannelRuntime {self.spec.name} {self.state.value} attempts={self.attempts}>"

    # --- the service ------------------------------------------------------------------------

    async def serve(self) -> None:
        """The kernel's service for this channel: attempts, with backoff between, until cancelled."""
        delay = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        try:
            while True:
                self.attempts += 1
                self.state = State.STARTING
                began = loop.time()
                try:
                    await self._attempt_or_restart()
                    error: BaseException | None = None
                except _Restart:
                    delay = BACKOFF_MIN_S
                    continue
                except Exception as exc:
                    error = exc
                if loop.time() - began > HEALTHY_AFTER_S:
                    delay = BACKOFF_MIN_S
                self._failed(error, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._restart.wait()
                if self._restart.is_set():
                    delay = BACKOFF_MIN_S
                else:
                    delay = min(delay * 2, BACKOFF_MAX_S)
        finally:
            self.state = State.STOPPED
            self._running.clear()

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value
        for states, waiter in self._state_waiters:
            if value in states and not waiter.done():
                waiter.set_result(None)

    async def wait_state(self, *states: State) -> None:
        """Until the channel is in one of ``states`` (at once if it is)."""
        if self._state in states:
            return
        entry = (frozenset(states), asyncio.get_running_loop().create_future())
        self._state_waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._state_waiters.remove(entry)

    def restart(self) -> None:
        """End the current attempt (or the wait before the next) and start afresh, backoff reset."""
        self._restart.set()

    async def wait_running(self) -> None:
        await self._running.wait()

    def _failed(self, error: BaseException | None, delay: float) -> None:
        self._running.clear()
        permanent = any(isinstance(leaf, PERMANENT) for leaf in _leaves(error))
        self.state = State.FAILED if permanent else State.BACKING_OFF
        self.last_error = _describe(error)
        self.error_at = utcnow()
        self.next_attempt_at = self.error_at + timedelta(seconds=delay)
        if error is None or all(isinstance(leaf, ChannelError) for leaf in _leaves(error)):
            log.warning("channel %s: %s; trying again in %.0f s", self.spec.name, self.last_error, delay)
        else:
            log.warning("channel %s failed; trying again in %.0f s", self.spec.name, delay, exc_info=error)

    async def _attempt_or_restart(self) -> None:
        self._restart.clear()
        attempt = asyncio.ensure_future(self._attempt())
        restart = asyncio.ensure_future(self._restart.wait())
        try:
            await asyncio.wait({attempt, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (attempt, restart):
                task.cancel()
            await asyncio.wait({attempt, restart})
            # Taken here, also when this task is being cancelled (else asyncio logs it as never retrieved).
            error = None if attempt.cancelled() else attempt.exception()
        if error is not None:
            raise error
        if restart.done() and not restart.cancelled():
            raise _Restart()

    async def _attempt(self) -> None:
        if not self.kernel.agents.exists(self.spec.agent):
            raise LookupError(f"the agent {self.spec.agent!r} does not exist")
        platform = self._factory(self.spec)
        try:
            await platform.start()
            loop = asyncio.get_running_loop()
            outbox = Outbox(self.kernel.store, self.spec.name, self.spec.limits, max_age_s=self.spec.outbox_max_age_s,
                            clock=loop.time)
            await outbox.load()
            async with asyncio.TaskGroup() as group:
                followers = Followers(self.kernel, self.spec, outbox, platform, group, loop.time)
                chats = Chats(self.kernel, self.spec, outbox, followers)
                self._keep_counts()
                self.outbox, self.followers, self.chats = outbox, followers, chats
                await followers.resume()
                group.create_task(outbox.run(platform), name=f"channel:{self.spec.name}:outbox")
                group.create_task(self._receive(platform), name=f"channel:{self.spec.name}:receive")
                group.create_task(self._prune_forever(), name=f"channel:{self.spec.name}:prune")
                self.state, self.last_error, self.next_attempt_at = State.RUNNING, None, None
                self.started_at = utcnow()
                self._running.set()
        finally:
            self._running.clear()
            await platform.aclose()

    async def _receive(self, platform: Platform) -> None:
        await platform.receive(self._take_all, self._trouble)
        raise Transient("the platform's connection ended")

    def _keep_counts(self) -> None:
        if self.chats is not None:
            for name, count in self.chats.counts.items():
                self._counts[name] = self._counts.get(name, 0) + count
        if self.outbox is not None:
            self._sent_before += self.outbox.sent
            self._failed_before += self.outbox.failed

    def _trouble(self, error: Exception | None) -> None:
        """The client's word on its receive loop: failing (and retrying), or working again."""
        if error is None:
            if self.state is State.BACKING_OFF and self._running.is_set():
                self.state, self.last_error = State.RUNNING, None
            return
        self.state, self.last_error, self.error_at = State.BACKING_OFF, _describe(error), utcnow()

    async def _prune_forever(self) -> None:
        name = self.spec.name
        while True:
            cutoff = utcnow() - timedelta(days=KEEP_DAYS)
            await self.kernel.store.write(lambda conn, cutoff=cutoff: rows.prune(conn, name, cutoff))  # type: ignore[misc]
            await asyncio.sleep(PRUNE_EVERY_S)

    # --- messages in ------------------------------------------------------------------------

    async def _take_all(self, batch: list[Inbound]) -> None:
        """Take a batch the platform delivered: each chat's messages in order, chats at once.
        Returns once every one is durable (the platform's acknowledgement waits for that)."""
        by_chat: dict[str, list[Inbound]] = {}
        for message in batch:
            by_chat.setdefault(message.chat_id, []).append(message)

        async def chat_in_order(messages: list[Inbound]) -> None:
            for message in messages:
                await self.take(message)

        async with asyncio.TaskGroup() as group:
            for messages in by_chat.values():
                group.create_task(chat_in_order(messages))

    async def take(self, message: Inbound) -> Taken:
        chats = self.chats
        if chats is None or not self._running.is_set():
            raise ChannelNotRunning(f"the channel {self.spec.name} is {self.state.value}")
        return await chats.take(message)

    async def take_push(self, headers: Mapping[str, str], body: bytes) -> list[Taken]:
        """A request the platform pushed (a webhook): checked by the platform's client, then taken."""
        if not self._running.is_set() or self.platform is None:
            raise ChannelNotRunning(f"the channel {self.spec.name} is {self.state.value}")
        return [await self.take(message) for message in self.platform.parse_push(headers, body)]

    @property
    def platform(self) -> Platform | None:
        return self.followers.platform if self.followers is not None else None

    # --- what GET /v1/channels shows --------------------------------------------------------

    async def view(self) -> dict[str, Any]:
        store_counts = await self.kernel.store.read(_counts, self.spec.name)
        chats = self.chats.counts if self.chats is not None else {}
        counts = {name: self._counts.get(name, 0) + chats.get(name, 0) for name in set(self._counts) | set(chats)}
        outbox = self.outbox.statistics() if self.outbox is not None and self._running.is_set() else {}
        return {
            "name": self.spec.name, "kind": self.spec.kind.value, "agent": self.spec.agent,
            "transport": self.spec.transport, "state": self.state.value, "last_error": self.last_error,
            "error_at": _iso(self.error_at), "next_attempt_at": _iso(self.next_attempt_at),
            "started_at": _iso(self.started_at), "attempts": self.attempts, "chats": store_counts["chats"],
            "messages_in": counts.get("accepted", 0) + counts.get("command", 0) + counts.get("pressed", 0),
            "messages_out": self._sent_before + (self.outbox.sent if self.outbox is not None else 0),
            "refused": counts.get("refused", 0), "duplicates": counts.get("duplicate", 0),
            "replies_in_progress": len(self.followers) if self.followers is not None and self._running.is_set() else 0,
            "outbox": {"depth": store_counts["outbox"].get(rows.PENDING, 0),
                       "failed": store_counts["outbox"].get(rows.FAILED, 0),
                       "sent": store_counts["outbox"].get(rows.SENT, 0),
                       "retries": outbox.get("retries", 0), "rate_limited": outbox.get("rate_limited", 0)},
        }


def _counts(conn: Any, channel: str) -> dict[str, Any]:
    return {"chats": rows.chat_count(conn, channel), "outbox": rows.outbox_counts(conn, channel)}


def _leaves(error: BaseException | None) -> list[BaseException]:
    if error is None:
        return []
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "the platform's connection ended"
    return "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in _leaves(error))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
