"""Subagents: a run hands a task to a child session and keeps going; the child reports back.

``spawn_subagent(task, agent?)`` creates a child session linked to the parent session and
run, queues the task there and returns at once. When the child's work ends, an announce
message (its result or its error) enters the parent session in ``steer`` mode: into the
parent's active run if it has one, else as the next run. ``wait_subagents()`` parks the
parent run in ``waiting`` (holding no slot) until its children have reported.

Exactly once, across crashes: the announce is sent under the idempotency key
``announce:<child>``, and the link is marked announced only afterwards; a restart announces
every link not yet marked, and the key turns a repeat into a no-op.

Ends to handle wait in a table keyed by what they are about (a child, or a cancelled parent
run), so it never holds more than two entries per open link; nothing in it is ever dropped
(see ``Subagents._on_run_end``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from corral.clock import utcnow
from corral.errors import Conflict, CorralError, NotFound, ShuttingDown, ToolError
from corral.kernel import Kernel
from corral.kernel.runs import RunEnd
from corral.services.limits import SubagentLimits
from corral.store import NewEvent, ops, repo
from corral.store import tables as t
from corral.tools.base import Tool, ToolContext
from corral.types import CancelMode, EventType, Mode, RunStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Link:
    parent_session_id: str
    parent_run_id: str
    depth: int


class Subagents:
    def __init__(self, kernel: Kernel, limits: SubagentLimits | None = None):
        self.kernel = kernel
        self.limits = limits or SubagentLimits()
        # Children whose end has not been announced yet (all of them, whatever their parent).
        self._open: dict[str, Link] = {}
        # Ends still to handle, oldest first, keyed by the child they report ("child", id) or
        # the parent run whose cancel cascades ("cancel", id); see _on_run_end.
        self._pending: dict[tuple[str, str], RunEnd] = {}
        self._arrived = asyncio.Event()
        self.merged = 0  # ends folded into a pending one with the same key
        # Children cancelled because their parent run was: their end is recorded, not announced
        # (the person who stopped the parent does not want a new run started in its name).
        self._cascaded: set[str] = set()
        self._settled = asyncio.Condition()
        self.announced = 0
        # Set once what ended while the service was down has been announced.
        self.caught_up = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Subagents open={len(self._open)} pending={len(self._pending)} announced={self.announced}>"

    def statistics(self) -> dict[str, int]:
        """Links open, ends pending, reports announced and ends merged since start."""
        return {"open": len(self._open), "pending": len(self._pending), "announced": self.announced,
                "merged": self.merged}

    # --- the service ---------------------------------------------------------------------

    def _on_run_end(self, ended: RunEnd) -> None:
        """Note an end to handle. The overflow policy: nothing is dropped, and nothing needs to be.

        A report must never be lost, and this listener is synchronous (it cannot wait for room),
        so instead of a queue with a size the ends wait in a table keyed by what they are about:
        a child's end by the child, a parent run's cancel by the run. Only an end about an open
        link gets in, so the table holds at most two entries per open link (its child, its
        parent run), and open links are what ``max_total`` bounds at spawn: refusing a spawn is
        the backpressure. A second end with a key already pending merges into the first (counted
        in ``merged``): a child is announced once, with its first end, as it always was, and a
        parent run's children are cancelled once.
        """
        key: tuple[str, str]
        if ended.session_id in self._open and not ended.continued:
            key = ("child", ended.session_id)
        elif (ended.status is RunStatus.CANCELLED and self.limits.cascade_cancel
              and any(link.parent_run_id == ended.run_id for link in self._open.values())):
            key = ("cancel", ended.run_id)  # a parent run cancelled: its children go with it
        else:
            return
        if key in self._pending:
            self.merged += 1
            return
        self._pending[key] = ended
        self._arrived.set()

    def _on_adopted(self, session_id: str) -> None:
        """This node took a session over from a node that died or left (a cluster): if it is a
        subagent not yet announced, its report is now this node's to make."""
        if session_id not in self._open:
            self.kernel.supervisor.spawn(self._adopt(session_id), f"subagent-adopt:{session_id}")

    async def _adopt(self, child: str) -> None:
        link = await self.kernel.store.read(repo.subagent_link, child)
        if link is None or link.announced_at is not None or child in self._open:
            return
        self._open[child] = Link(link.parent_session_id, link.parent_run_id, link.depth)
        last = await self.kernel.store.read(repo.latest_run, child)
        if last is not None and RunStatus(last.status).is_terminal and ("child", child) not in self._pending:
            # It ended before this node knew of it (an end this node recorded, or the dead node's).
            self._pending[("child", child)] = RunEnd(child, last.id, RunStatus(last.status), last.output,
                                                     last.error, continued=False)
            self._arrived.set()

    async def _next_pending(self) -> RunEnd:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.pop(next(iter(self._pending)))

    async def run(self) -> None:
        """Announce what ended while the service was down, then each child's end as it comes."""
        links = await self.kernel.store.read(repo.unannounced_subagents)
        for link in links:
            self._open[link.child_session_id] = Link(link.parent_session_id, link.parent_run_id, link.depth)
        for link in links:
            last = await self.kernel.store.read(repo.latest_run, link.child_session_id)
            if last is not None and RunStatus(last.status).is_terminal:
                await self._announce(RunEnd(link.child_session_id, last.id, RunStatus(last.status), last.output,
                                            last.error, continued=False))
        self.caught_up.set()
        while True:
            ended = await self._next_pending()
            try:
                if ended.session_id in self._open:
                    await self._announce(ended)
                else:
                    await self._cascade(ended.run_id)
            except ShuttingDown:
                return  # what is left is announced at the next start
            except CorralError as exc:
                log.warning("subagent bookkeeping for %s failed: %s", ended.session_id, exc)

    async def _announce(self, ended: RunEnd) -> None:
        child = ended.session_id
        link = self._open[child]
        result = ended.output or (ended.error or {}).get("message") or ""
        text = f"[subagent {child} {ended.status.value}] {result}".rstrip()
        await self.kernel.store.write(lambda conn: repo.update_subagent(
            conn, child, status=ended.status.value, result=result))
        announce_run_id = None
        if child not in self._cascaded:
            accepted = await self.kernel.submit_anywhere(link.parent_session_id, text, mode=Mode.STEER,
                                                         origin="subagent", idempotency_key=f"announce:{child}")
            announce_run_id = accepted.run_id
        event = NewEvent(link.parent_session_id, EventType.SUBAGENT_COMPLETED, link.parent_run_id, {
            "child_session_id": child, "status": ended.status.value, "result": result,
            "announce_run_id": announce_run_id})
        # Only the node that holds the parent's lane appends to its log (a cluster: seqs are numbered
        # by the owner's writer); elsewhere the report itself, the input above, is what it gets.
        here = self.kernel.ownership is None or self.kernel.sessions.live(link.parent_session_id) is not None
        await self.kernel.store.write(
            [ops.Call(lambda conn: repo.update_subagent(conn, child, announced_at=utcnow()))],
            [event] if here else [])
        async with self._settled:
            self._open.pop(child, None)
            self._cascaded.discard(child)
            self.announced += 1
            self._settled.notify_all()

    async def _cascade(self, parent_run_id: str) -> None:
        for child, link in list(self._open.items()):
            if link.parent_run_id != parent_run_id:
                continue
            self._cascaded.add(child)
            runtime = self.kernel.sessions.live(child)
            for run_id in list(runtime.handles) if runtime is not None else []:
                try:
                    await self.kernel.cancel(run_id, CancelMode.HARD)
                except (Conflict, NotFound):
                    pass  # it ended on its own meanwhile

    # --- the tools -----------------------------------------------------------------------

    async def spawn(self, task: str, agent: str | None, context: ToolContext) -> str:
        parent = self.kernel.sessions.live(context.session_id)
        if parent is None:
            raise ToolError("the parent session is not loaded")
        depth = await self._depth_of(context.session_id) + 1
        if depth > self.limits.max_depth:
            raise ToolError(f"subagents may nest {self.limits.max_depth} deep; this one would be {depth} deep")
        if len(self._open) >= self.limits.max_total:
            raise ToolError(f"{self.limits.max_total} subagents are already at work; wait for some to finish")
        siblings = len(await self.kernel.store.read(repo.children_of_session, context.session_id))
        if siblings >= self.limits.max_children_per_session:
            raise ToolError(f"this session already spawned {siblings} subagents (the limit)")
        name = agent or context.agent
        try:
            self.kernel.agents.get(name)
        except NotFound as exc:
            raise ToolError(str(exc)) from exc
        row, _ = await self.kernel.sessions.create(
            name, None, {"parent_session_id": context.session_id, "task": task[:200]}, owner=parent.owner)
        child = row["id"]
        link = {"child_session_id": child, "parent_session_id": context.session_id,
                "parent_run_id": context.run_id, "depth": depth, "task": task, "created_at": utcnow()}
        await self.kernel.store.write([ops.Insert(t.subagents, [link])])
        self._open[child] = Link(context.session_id, context.run_id, depth)
        accepted = await self.kernel.submit(child, task, origin="subagent")
        await self.kernel.store.write(None, [NewEvent(context.session_id, EventType.SUBAGENT_SPAWNED, context.run_id, {
            "child_session_id": child, "child_run_id": accepted.run_id, "agent": name, "task": task})])
        return f"spawned subagent {child} (agent {name}); its report will arrive as a message"

    async def wait(self, context: ToolContext) -> str:
        def pending() -> list[str]:
            return [c for c, link in self._open.items() if link.parent_run_id == context.run_id]

        async def all_reported() -> None:
            async with self._settled:
                await self._settled.wait_for(lambda: not pending())

        waiting_for = pending()
        if waiting_for:
            await self.kernel.wait_in_run(context.run_id, {"waiting_for": "subagents", "children": waiting_for},
                                          all_reported())
        children = await self.kernel.store.read(repo.children_of_run, context.run_id)
        if not children:
            return "no subagents were spawned by this run"
        return "\n".join(f"{c.child_session_id} ({c.status}): {c.result or ''}".rstrip() for c in children)

    async def _depth_of(self, session_id: str) -> int:
        link = self._open.get(session_id)
        if link is not None:
            return link.depth
        row = await self.kernel.store.read(repo.subagent_link, session_id)
        return int(row.depth) if row is not None else 0


class SpawnArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=100_000, description="what the subagent should do, self-contained")
    agent: str | None = Field(None, description="which agent does it (default: this one)")


class WaitArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


def install_subagents(kernel: Kernel, limits: SubagentLimits | None = None) -> Subagents:
    """The subagent service (owned and restarted by the kernel) and its two tools."""
    service = Subagents(kernel, limits)

    async def spawn(args: SpawnArgs, context: ToolContext) -> str:
        return await service.spawn(args.task, args.agent, context)

    async def wait(args: WaitArgs, context: ToolContext) -> str:
        return await service.wait(context)

    kernel.tools.add(Tool("spawn_subagent", "Hand a task to a subagent working in its own session; returns at "
                          "once, and the subagent's report arrives later as a message.", SpawnArgs, spawn))
    kernel.tools.add(Tool("wait_subagents", "Wait until every subagent this run spawned has reported; returns "
                          "their results.", WaitArgs, wait))
    kernel.on_run_end(service._on_run_end)
    kernel.adopted_listeners.append(service._on_adopted)
    kernel.add_service("subagents", service.run)
    return service
