"""Several `corral serve` processes on one Postgres database (DESIGN.md section 6, docs/cluster.md).

Postgres is the only coordinator: node rows with heartbeats (``node``), session ownership
claimed with conditional updates and fenced commits (``membership``, ``corral.store.nodes``),
and wake-up hints for observers (``hints``). ``join`` wires a kernel into it.
"""

from __future__ import annotations

from collections.abc import Callable

from corral.cluster.hints import Hints, agents_changed, notifier
from corral.cluster.membership import Membership
from corral.cluster.node import Node
from corral.kernel import Kernel
from corral.metrics import Metrics
from corral.store import Store

__all__ = ["Membership", "Node", "join", "membership_for"]


def membership_for(store: Store, metrics: Metrics, *, url: str, database_url: str, lease_ttl_s: float,
                   heartbeat_s: float, on_fenced: Callable[[], None]) -> Membership:
    """This process's node and its membership, before the kernel that will use it exists."""
    node = Node(url, database_url, lease_ttl_s=lease_ttl_s, heartbeat_s=heartbeat_s, on_fenced=on_fenced)
    return Membership(store, node, metrics)


def join(kernel: Kernel, membership: Membership, database_url: str) -> None:
    """Make the kernel a node: it joins as it starts (after the writer, before recovery) and
    leaves as it stops; takes over dead nodes; sends and follows observers' wake-up hints."""
    kernel.add_lifecycle(membership.join, membership.leave)
    membership.attach(kernel)
    kernel.store.writer.after_commit = notifier(membership.node_id)
    tell = agents_changed(membership.node_id)
    kernel.agents.on_change = lambda: kernel.store.emit_unit(tell)
    hints = Hints(kernel, membership.node_id, database_url)
    kernel.add_service("cluster-hints", hints.run)
