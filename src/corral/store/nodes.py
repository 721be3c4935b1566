"""Nodes and session ownership in the database: the cluster's only coordinator is Postgres.

Functions of a ``Connection``; the caller owns the transaction. Postgres only (a cluster
needs a database several processes share): times are the database's ``now()``, so no node
compares its own clock with another's, and row locks and conditional updates do all the
coordination.

Fencing, in one sentence: a takeover marks the dead node's row ``dead`` in the same
transaction that frees its sessions, and every commit of a node's writer first reads its
own row ``FOR SHARE`` (``check_fence``), so the two serialise and a zombie's commit after
the takeover sees ``dead`` and rolls back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.errors import Fenced

LIVE = "live"  # the other states, "left" and "dead", are only ever written by the SQL below

# What the writer runs first in each batch's transaction (``Writer.fence``).
FenceCheck = Callable[[Any], None]


def join(conn: Connection, node_id: str, url: str) -> int:
    """Register this node; returns its incarnation. Live rows of the same URL are this node's
    earlier incarnations (one address serves one node): they are marked dead and their
    sessions freed at once, rather than waiting for their lease to run out."""
    earlier = conn.execute(sa.text("SELECT id, state FROM nodes WHERE url = :url FOR UPDATE"), {"url": url}).all()
    stale = [row.id for row in earlier if row.state == LIVE]
    if stale:
        _bury(conn, stale)
    conn.execute(sa.text(
        "INSERT INTO nodes (id, url, incarnation, state, started_at, heartbeat_at) "
        "VALUES (:id, :url, :incarnation, 'live', now(), now())"),
        {"id": node_id, "url": url, "incarnation": len(earlier) + 1})
    return len(earlier) + 1


def leave(conn: Connection, node_id: str) -> int:
    """A graceful exit: the node's sessions are released at once (returns how many)."""
    conn.execute(sa.text("UPDATE nodes SET state = 'left' WHERE id = :id AND state = 'live'"), {"id": node_id})
    freed = conn.execute(sa.text("UPDATE sessions SET node_id = NULL WHERE node_id = :id"), {"id": node_id})
    return int(freed.rowcount or 0)


def check_fence(conn: Connection, node_id: str) -> None:
    """Inside a write transaction: go on only if this node is still live (see the module doc)."""
    state = conn.execute(sa.text("SELECT state FROM nodes WHERE id = :id FOR SHARE"), {"id": node_id}).scalar()
    if state != LIVE:
        raise Fenced(f"node {node_id} is {state or 'unknown'}: its sessions were taken over, it may commit nothing")


def take_over_dead(conn: Connection, lease_ttl_s: float) -> list[str]:
    """Mark every live node whose heartbeat is older than the lease dead and free its sessions,
    in one transaction; returns the nodes taken over."""
    dead = [row.id for row in conn.execute(sa.text(
        "SELECT id FROM nodes WHERE state = 'live' AND heartbeat_at < now() - make_interval(secs => :ttl) "
        "FOR UPDATE SKIP LOCKED"), {"ttl": lease_ttl_s}).all()]
    if dead:
        _bury(conn, dead)
    return dead


def _bury(conn: Connection, node_ids: list[str]) -> None:
    conn.execute(sa.text("UPDATE nodes SET state = 'dead' WHERE id = ANY(:ids)"), {"ids": node_ids})
    conn.execute(sa.text("UPDATE sessions SET node_id = NULL WHERE node_id = ANY(:ids)"), {"ids": node_ids})


def orphans_with_work(conn: Connection, limit: int) -> list[str]:
    """Sessions nobody owns that still have unfinished runs: a node that left or died left them."""
    rows = conn.execute(sa.text(
        "SELECT DISTINCT r.session_id FROM runs r JOIN sessions s ON s.id = r.session_id "
        "WHERE s.node_id IS NULL AND r.status IN ('queued', 'running', 'waiting') LIMIT :limit"),
        {"limit": limit}).all()
    return [row.session_id for row in rows]


@dataclass(frozen=True)
class Claim:
    """Where a session's lane lives after an attempt to take it."""

    # mine: this node already owned it; adopted: this node just took it (recover it first);
    # elsewhere: a live node owns it (forward to ``url``); pending: its owner's lease ran out but
    # no node has taken it over yet (retry shortly); missing: no such session.
    kind: str
    node_id: str | None = None
    url: str | None = None


def claim(conn: Connection, session_id: str, node_id: str, lease_ttl_s: float) -> Claim:
    """Take the session's lane for this node if nobody live holds it.

    Two statements on purpose: the session's row is locked first, then its owner read. In
    one statement (a join ``FOR UPDATE OF sessions``), a claim that waited for another claim's
    lock re-reads the session's row but not the joined node's, so it saw the new owner with
    no node row, took it for gone and claimed the session too (found by the cluster tests).
    """
    owner = conn.execute(sa.text("SELECT node_id FROM sessions WHERE id = :sid FOR UPDATE"),
                         {"sid": session_id}).first()
    if owner is None:
        return Claim("missing")
    if owner.node_id == node_id:
        return Claim("mine", node_id)
    if owner.node_id is not None:
        node = conn.execute(sa.text(
            "SELECT url, state, heartbeat_at >= now() - make_interval(secs => :ttl) AS fresh "
            "FROM nodes WHERE id = :id"), {"id": owner.node_id, "ttl": lease_ttl_s}).first()
        if node is not None and node.state == LIVE:
            return Claim("elsewhere" if node.fresh else "pending", owner.node_id, node.url)
    conn.execute(sa.text("UPDATE sessions SET node_id = :me WHERE id = :sid"), {"me": node_id, "sid": session_id})
    return Claim("adopted", node_id)


def is_alive(conn: Connection, node_id: str, lease_ttl_s: float) -> bool:
    """Live, and its heartbeat younger than the lease."""
    return bool(conn.execute(sa.text(
        "SELECT 1 FROM nodes WHERE id = :id AND state = 'live' "
        "AND heartbeat_at >= now() - make_interval(secs => :ttl)"),
        {"id": node_id, "ttl": lease_ttl_s}).first())


def cluster_view(conn: Connection) -> list[dict[str, Any]]:
    """Every node with its state, heartbeat age, sessions owned and runs active."""
    rows = conn.execute(sa.text(
        "SELECT n.id, n.url, n.incarnation, n.state, n.started_at, "
        "EXTRACT(EPOCH FROM now() - n.heartbeat_at) AS heartbeat_age_s, "
        "(SELECT count(*) FROM sessions s WHERE s.node_id = n.id) AS sessions_owned, "
        "(SELECT count(*) FROM runs r JOIN sessions s ON s.id = r.session_id "
        " WHERE s.node_id = n.id AND r.status IN ('running', 'waiting')) AS runs_active "
        "FROM nodes n ORDER BY n.started_at")).all()
    return [{"id": r.id, "url": r.url, "incarnation": r.incarnation, "state": r.state,
             "started_at": _iso(r.started_at), "heartbeat_age_s": round(float(r.heartbeat_age_s), 3),
             "sessions_owned": int(r.sessions_owned), "runs_active": int(r.runs_active)} for r in rows]


def _iso(value: datetime) -> str:
    return value.isoformat()
