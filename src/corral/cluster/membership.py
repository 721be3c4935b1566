"""This node's part in the cluster: joining, claiming sessions, taking over dead nodes, leaving.

Every session's lane lives on exactly one live node, its owner, recorded in the sessions
table and claimed on first use (``claim``, the kernel's ``Ownership`` port). A node that
stops heartbeating for ``lease_ttl_s`` is dead: the first live node to notice marks it so
and frees its sessions in one transaction (fencing it: its writer's next commit is
refused), then adopts those with unfinished work, recovering each exactly as a single
node recovers after a crash (``Membership.take_over``, run every second). A node that
shuts down releases its sessions at once instead of letting its lease run out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from corral.cluster.node import Node
from corral.errors import NotFound, OwnedElsewhere, StoreUnavailable
from corral.metrics import Metrics
from corral.store import nodes

if TYPE_CHECKING:
    from corral.kernel import Kernel
    from corral.store import Store

log = logging.getLogger(__name__)

TAKEOVER_EVERY_S = 1.0
# Sessions adopted per pass of the takeover loop (the rest wait for the next pass).
ADOPT_BATCH = 500


class Membership:
    def __init__(self, store: Store, node: Node, metrics: Metrics):
        self.store = store
        self.node = node
        self.metrics = metrics
        self.kernel: Kernel | None = None  # set by ``attach``: what adopted sessions are loaded into
        self.takeovers = 0
        self.acquisitions = 0
        self.joined = False  # once the join committed (deferred while the store refuses writes)

    def __repr__(self) -> str:
        return f"<Membership {self.node!r} acquisitions={self.acquisitions} takeovers={self.takeovers}>"

    @property
    def node_id(self) -> str:
        return self.node.id

    def attach(self, kernel: Kernel) -> None:
        self.kernel = kernel
        kernel.add_service("cluster-takeover", self.take_over_forever)

    async def join(self) -> None:
        """Register this node (burying its earlier incarnations), fence the writer on its lease,
        and start heartbeating. Called once the writer runs, before the kernel recovers.

        A store that refuses the write (a full disk) does not stop the start: until the join
        commits, the writer's gate refuses every other write (503 with Retry-After; a node that
        is not a member must not claim a session), reads are served, and the join is retried in
        the background (``Readiness.retry``) until it commits."""
        self.store.writer.gate = "this node has not joined the cluster yet: its store takes no writes"
        try:
            await self._join()
        except StoreUnavailable as exc:
            assert self.kernel is not None
            log.warning("node %s could not join the cluster (%s): it commits nothing until it has", self.node.id, exc)
            self.kernel.readiness.retry("cluster join", self._join)

    async def _join(self) -> None:
        def fence(conn: object) -> None:
            self.node.check_lease()
            nodes.check_fence(conn, self.node.id)  # type: ignore[arg-type]

        incarnation = await self.store.join_node(self.node.id, self.node.url)
        writer = self.store.writer
        writer.fence = self._counted(fence)
        writer.gate = None
        self.joined = True
        self.node.start()
        log.info("node %s joined the cluster at %s (incarnation %d)", self.node.id, self.node.url, incarnation)

    def _counted(self, fence: nodes.FenceCheck) -> nodes.FenceCheck:
        def check(conn: object) -> None:
            try:
                fence(conn)
            except Exception:
                self.metrics.fenced_commits.inc()
                raise
        return check

    async def leave(self) -> None:
        """A graceful exit: stop heartbeating, then release every session at once.

        In that order: a renewal after the row says ``left`` finds no live row, which is what a
        node that was taken over sees, so a heartbeat still beating would report this node's own
        exit as a takeover. The lease it last renewed covers the leaving write. A store that
        refuses that write (a full disk, an unreachable database) does not stop the shutdown:
        the sessions are taken over once the lease runs out, as after a crash."""
        try:
            await asyncio.to_thread(self.node.stop)
            if self.joined and self.node.holds_lease():
                freed = await self.store.write(lambda conn: nodes.leave(conn, self.node.id), translate=True)
                log.info("node %s left the cluster, releasing %d sessions", self.node.id, freed)
        except StoreUnavailable as exc:  # fenced meanwhile, too
            log.warning("node %s could not release its sessions (%s): they move once its lease runs out",
                        self.node.id, exc)
        finally:
            self.node.stop()

    async def claim(self, session_id: str) -> bool:
        taken = await self.store.claim_session(session_id, self.node.id, self.node.lease_ttl_s)
        if taken.kind == "missing":
            raise NotFound(f"no session {session_id!r}")
        if taken.kind == "elsewhere":
            assert taken.node_id is not None and taken.url is not None
            raise OwnedElsewhere(f"session {session_id} lives on node {taken.node_id}", taken.node_id, taken.url)
        if taken.kind == "pending":
            raise StoreUnavailable(f"session {session_id} lives on node {taken.node_id}, which stopped answering; "
                                   "it moves to a live node when that node's lease runs out",
                                   retry_after=self.node.heartbeat_s)
        if taken.kind == "adopted":
            self.acquisitions += 1
            self.metrics.ownership_acquisitions.inc()
        return taken.kind == "adopted"

    async def take_over_forever(self) -> None:
        """The kernel's service: every second, bury dead nodes and adopt the sessions with work
        that nobody owns (theirs, and those of nodes that left)."""
        while True:
            try:
                await self.take_over()
            except StoreUnavailable as exc:  # not joined yet, or the store takes no writes: the next pass
                log.debug("node %s: no takeover pass: %s", self.node.id, exc)
            await asyncio.sleep(TAKEOVER_EVERY_S)

    async def take_over(self) -> int:
        """One pass; returns how many sessions were adopted."""
        assert self.kernel is not None
        dead = await self.store.write(lambda conn: nodes.take_over_dead(conn, self.node.lease_ttl_s))
        if dead:
            self.takeovers += len(dead)
            self.metrics.takeovers.inc(len(dead))
            log.warning("node %s took over dead nodes %s", self.node.id, ", ".join(dead))
        orphans = await self.store.read(nodes.orphans_with_work, ADOPT_BATCH)
        adopted = 0
        for session_id in orphans:
            try:
                await self.kernel.sessions.get(session_id)  # claims it, and recovers it if it is now ours
                adopted += 1
            except (OwnedElsewhere, StoreUnavailable, NotFound):
                continue  # another node was quicker, or it is not free after all
        return adopted
