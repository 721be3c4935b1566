"""Observers on any node follow a session live, whichever node commits its events.

The store stays the truth (seq per session; resuming is ``seq > last``); what crosses
nodes is only a wake-up hint carrying session ids, never an event. The writer sends one
``NOTIFY`` per commit, after it and outside its transaction, naming the sessions whose
events it carried; every node ``LISTEN``s, and a hint for a session it has observers of
makes them read the store (``EventHub.hint``). Hints can be lost (a dropped connection),
so every second each node also hints the observed sessions whose lanes live elsewhere:
the poll fallback bounds how late an observer can be.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from corral.cluster.node import asyncpg_dsn

if TYPE_CHECKING:
    from corral.kernel import Kernel

log = logging.getLogger(__name__)

CHANNEL = "corral_events"
# Another node created or deleted an agent: every node runs every agent, so each syncs.
AGENTS_CHANNEL = "corral_agents"
POLL_S = 1.0
# The agents are compared with the store every this many polls, should a hint be lost.
AGENT_SYNC_POLLS = 5
# Postgres caps a notification's payload at 8,000 bytes.
PAYLOAD_MAX = 7_000
NOTIFY = sa.text("SELECT pg_notify('corral_events', :payload)")
NOTIFY_AGENTS = sa.text("SELECT pg_notify('corral_agents', :node)")


def payloads(node_id: str, ranges: dict[str, tuple[int, int]]) -> list[str]:
    """``node|sid:first:last,...`` chunks under Postgres's payload limit."""
    chunks: list[str] = []
    current: list[str] = []
    size = len(node_id) + 1
    for sid in sorted(ranges):
        first, last = ranges[sid]
        item = f"{sid}:{first}:{last}"
        if current and size + len(item) + 1 > PAYLOAD_MAX:
            chunks.append(f"{node_id}|{','.join(current)}")
            current, size = [], len(node_id) + 1
        current.append(item)
        size += len(item) + 1
    if current:
        chunks.append(f"{node_id}|{','.join(current)}")
    return chunks


def parse(payload: str) -> tuple[str, dict[str, tuple[int, int]]]:
    sender, _, items = payload.partition("|")
    ranges: dict[str, tuple[int, int]] = {}
    for item in items.split(","):
        sid, _, span = item.partition(":")
        first, _, last = span.partition(":")
        if sid and first.isdigit() and last.isdigit():
            ranges[sid] = (int(first), int(last))
    return sender, ranges


def notifier(node_id: str) -> Any:
    """The writer's ``after_commit``: send the commit's hints (on the writer's connection)."""

    def send(conn: Any, ranges: dict[str, tuple[int, int]]) -> None:
        with conn.begin():
            for payload in payloads(node_id, ranges):
                conn.execute(NOTIFY, {"payload": payload})

    return send


def agents_changed(node_id: str) -> Any:
    """A writer unit telling the other nodes that this one created or deleted an agent."""

    def send(conn: Any) -> None:
        conn.execute(NOTIFY_AGENTS, {"node": node_id})

    return send


class Hints:
    """Listens for other nodes' hints and polls as a fallback; a service of the kernel."""

    def __init__(self, kernel: Kernel, node_id: str, database_url: str):
        self.kernel = kernel
        self.node_id = node_id
        self._dsn = asyncpg_dsn(database_url)
        self.received = 0

    def __repr__(self) -> str:
        return f"<Hints {self.node_id} received={self.received}>"

    def on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sender, ranges = parse(payload)
        if sender == self.node_id:
            return  # this node's own commits reach its observers and feeds directly
        self.received += 1
        for session_id in ranges:
            self.kernel.hub.hint(session_id)
        if self.kernel.hub.has_feeds():
            self.kernel.supervisor.spawn(self._to_feeds(ranges), "cluster-feed-hint")

    async def _to_feeds(self, ranges: dict[str, tuple[int, int]]) -> None:
        """Feeds here hear of sessions whose lanes are elsewhere: the hinted events, read back."""
        for session_id, (first, last) in ranges.items():
            if self.kernel.hub.feeds_accept(session_id):
                events = await self.kernel.store.events_after(session_id, first - 1, limit=last - first + 1)
                self.kernel.hub.notify_feeds(events)

    async def run(self) -> None:
        """Listen until cancelled; a dropped connection fails the service (restarted with backoff)."""
        import asyncpg  # type: ignore[import-untyped]  # the driver the store's Postgres engine loads anyway

        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.add_listener(CHANNEL, self.on_notification)
            await conn.add_listener(AGENTS_CHANNEL, self.on_agents)
            polls = 0
            while not conn.is_closed():
                await asyncio.sleep(POLL_S)
                self.poll()
                polls += 1
                if polls % AGENT_SYNC_POLLS == 0:
                    await self.kernel.agents.sync()
            raise ConnectionError("the connection that listens for hints closed")
        finally:
            await conn.close(timeout=1)

    def on_agents(self, _conn: Any, _pid: int, _channel: str, sender: str) -> None:
        if sender != self.node_id:
            self.kernel.supervisor.spawn(self.kernel.agents.sync(), "cluster-agents-sync")

    def poll(self) -> None:
        """The fallback: observed sessions whose lanes are not here may have missed a hint."""
        for session_id in self.kernel.hub.observed_sessions():
            if self.kernel.sessions.live(session_id) is None:
                self.kernel.hub.hint(session_id)
