"""The cluster as this node sees it (admin): every node, its state and what it holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from corral.api.deps import KernelDep, PrincipalDep, require_admin
from corral.api.json_body import CheckedRoute
from corral.store import nodes

router = APIRouter(tags=["cluster"], route_class=CheckedRoute)


@router.get("/v1/cluster")
async def cluster(kernel: KernelDep, principal: PrincipalDep) -> dict[str, Any]:
    """Nodes with state, heartbeat age (seconds, by the database's clock), sessions owned and
    runs active; on SQLite, the one node there is."""
    require_admin(principal)
    ownership = kernel.ownership
    if ownership is None:
        return {"mode": "single", "node": None, "nodes": []}
    return {"mode": "cluster", "node": ownership.node_id, "nodes": await kernel.store.read(nodes.cluster_view)}
