"""Row-level reads and writes. Each takes a connection and never commits:
the caller owns the transaction (the writer's batch, or a read block)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.store import tables as t
from corral.store.events import Event
from corral.types import ACTIVE_STATUSES, ApprovalStatus, RunStatus

Row = sa.Row[Any]
NON_TERMINAL = [RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.WAITING.value]


# --- agents -------------------------------------------------------------------------

async def insert_agent(conn: AsyncConnection, name: str, config: dict[str, Any], now: datetime) -> None:
    await conn.execute(t.agents.insert().values(name=name, config=config, created_at=now))


async def delete_agent(conn: AsyncConnection, name: str) -> None:
    await conn.execute(t.agents.delete().where(t.agents.c.name == name))


async def all_agents(conn: AsyncConnection) -> Sequence[Row]:
    return (await conn.execute(sa.select(t.agents).order_by(t.agents.c.created_at))).all()


# --- sessions -----------------------------------------------------------------------

async def insert_session(conn: AsyncConnection, row: dict[str, Any]) -> None:
    await conn.execute(t.sessions.insert().values(**row))


async def get_session(conn: AsyncConnection, session_id: str) -> Row | None:
    return (await conn.execute(sa.select(t.sessions).where(t.sessions.c.id == session_id))).first()


async def update_session(conn: AsyncConnection, session_id: str, **values: Any) -> None:
    await conn.execute(t.sessions.update().where(t.sessions.c.id == session_id).values(**values))


async def completed_runs_count(conn: AsyncConnection, session_id: str) -> int:
    query = sa.select(sa.func.count()).select_from(t.runs).where(
        t.runs.c.session_id == session_id, t.runs.c.status == RunStatus.COMPLETED.value)
    return int((await conn.execute(query)).scalar() or 0)


async def session_owner(conn: AsyncConnection, session_id: str) -> str | None:
    return (await conn.execute(sa.select(t.sessions.c.owner).where(t.sessions.c.id == session_id))).scalar()


async def get_session_by_key(conn: AsyncConnection, owner: str, key: str) -> Row | None:
    query = sa.select(t.sessions).where(t.sessions.c.owner == owner, t.sessions.c.key == key)
    return (await conn.execute(query)).first()


async def list_sessions(
    conn: AsyncConnection, *, owner: str | None, agent: str | None, limit: int, offset: int
) -> Sequence[Row]:
    """Newest first; ``owner=None`` lists every principal's sessions."""
    query = sa.select(t.sessions).order_by(t.sessions.c.created_at.desc(), t.sessions.c.id)
    if owner is not None:
        query = query.where(t.sessions.c.owner == owner)
    if agent is not None:
        query = query.where(t.sessions.c.agent == agent)
    return (await conn.execute(query.limit(limit).offset(offset))).all()


async def session_counters(conn: AsyncConnection, session_id: str) -> tuple[int, float]:
    """The last input seq and the largest run position of a session (0 when new)."""
    seq = (await conn.execute(
        sa.select(sa.func.max(t.inputs.c.seq)).where(t.inputs.c.session_id == session_id)
    )).scalar()
    pos = (await conn.execute(
        sa.select(sa.func.max(t.runs.c.position)).where(t.runs.c.session_id == session_id)
    )).scalar()
    return int(seq or 0), float(pos or 0.0)


async def last_event_seqs(conn: AsyncConnection, session_ids: Sequence[str]) -> dict[str, int]:
    """Each session's newest event seq (absent: no event yet), for clients that follow "from now"."""
    if not session_ids:
        return {}
    # One index probe per session (the primary key is (session_id, seq)), not a scan of every event.
    newest = (sa.select(sa.func.max(t.events.c.seq)).where(t.events.c.session_id == t.sessions.c.id)
              .scalar_subquery())
    query = sa.select(t.sessions.c.id, newest).where(t.sessions.c.id.in_(session_ids))
    return {sid: int(seq) for sid, seq in (await conn.execute(query)).all() if seq is not None}


# --- inputs and runs ----------------------------------------------------------------

async def insert_run(conn: AsyncConnection, row: dict[str, Any]) -> None:
    await conn.execute(t.runs.insert().values(**row))


async def update_run(conn: AsyncConnection, run_id: str, **values: Any) -> None:
    await conn.execute(t.runs.update().where(t.runs.c.id == run_id).values(**values))


async def get_run(conn: AsyncConnection, run_id: str) -> Row | None:
    return (await conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id))).first()


async def list_runs(
    conn: AsyncConnection,
    *,
    session_ids: Sequence[str] | None,
    statuses: Sequence[str] | None,
    limit: int,
    offset: int,
    owner: str | None = None,
) -> Sequence[Row]:
    """Newest first; with ``owner``, only runs of that principal's sessions."""
    query = sa.select(t.runs).order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
    if owner is not None:
        owned = sa.select(t.sessions.c.id).where(t.sessions.c.owner == owner)
        query = query.where(t.runs.c.session_id.in_(owned))
    if session_ids is not None:
        query = query.where(t.runs.c.session_id.in_(session_ids))
    if statuses:
        query = query.where(t.runs.c.status.in_(statuses))
    return (await conn.execute(query.limit(limit).offset(offset))).all()


async def unfinished_runs(conn: AsyncConnection) -> Sequence[Row]:
    query = sa.select(t.runs).where(t.runs.c.status.in_(NON_TERMINAL)).order_by(t.runs.c.position)
    return (await conn.execute(query)).all()


async def inputs_of_runs(conn: AsyncConnection, run_ids: Sequence[str]) -> Sequence[Row]:
    if not run_ids:
        return []
    query = sa.select(t.inputs).where(t.inputs.c.run_id.in_(run_ids)).order_by(t.inputs.c.seq)
    return (await conn.execute(query)).all()


async def input_by_idempotency_key(conn: AsyncConnection, session_id: str, key: str) -> Row | None:
    query = sa.select(t.inputs).where(
        t.inputs.c.session_id == session_id, t.inputs.c.idempotency_key == key
    )
    return (await conn.execute(query)).first()


async def count_active_runs(conn: AsyncConnection, session_id: str) -> int:
    query = sa.select(sa.func.count()).select_from(t.runs).where(
        t.runs.c.session_id == session_id, t.runs.c.status.in_([s.value for s in ACTIVE_STATUSES])
    )
    return int((await conn.execute(query)).scalar() or 0)


# --- messages -----------------------------------------------------------------------

async def insert_messages(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(t.messages.insert(), rows)




async def session_messages(
    conn: AsyncConnection, session_id: str, *, include_rolled_back: bool, after_id: int = 0
) -> Sequence[Row]:
    """The session's messages in order; ``after_id`` skips those a compaction summarised."""
    query = (sa.select(t.messages).where(t.messages.c.session_id == session_id, t.messages.c.id > after_id)
             .order_by(t.messages.c.id))
    if not include_rolled_back:
        query = query.where(t.messages.c.rolled_back.is_(False))
    return (await conn.execute(query)).all()


async def latest_compaction(conn: AsyncConnection, session_id: str) -> Row | None:
    query = (sa.select(t.compactions).where(t.compactions.c.session_id == session_id)
             .order_by(t.compactions.c.id.desc()).limit(1))
    return (await conn.execute(query)).first()


# --- jobs ---------------------------------------------------------------------------

async def all_jobs(conn: AsyncConnection) -> Sequence[Row]:
    return (await conn.execute(sa.select(t.jobs).order_by(t.jobs.c.created_at))).all()


async def list_jobs(conn: AsyncConnection, *, owner: str | None) -> Sequence[Row]:
    query = sa.select(t.jobs).order_by(t.jobs.c.created_at.desc(), t.jobs.c.id)
    if owner is not None:
        query = query.where(t.jobs.c.owner == owner)
    return (await conn.execute(query)).all()


async def get_job(conn: AsyncConnection, job_id: str) -> Row | None:
    return (await conn.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id))).first()


async def job_fires(conn: AsyncConnection, job_id: str) -> Sequence[Row]:
    query = sa.select(t.job_fires).where(t.job_fires.c.job_id == job_id).order_by(t.job_fires.c.fire_at)
    return (await conn.execute(query)).all()


async def advance_job(conn: AsyncConnection, job_id: str, **values: Any) -> None:
    await conn.execute(t.jobs.update().where(t.jobs.c.id == job_id).values(**values))


async def delete_job(conn: AsyncConnection, job_id: str) -> None:
    await conn.execute(t.jobs.delete().where(t.jobs.c.id == job_id))


# --- subagents ---------------------------------------------------------------------

async def subagent_link(conn: AsyncConnection, child_session_id: str) -> Row | None:
    query = sa.select(t.subagents).where(t.subagents.c.child_session_id == child_session_id)
    return (await conn.execute(query)).first()


async def children_of_session(conn: AsyncConnection, parent_session_id: str) -> Sequence[Row]:
    query = (sa.select(t.subagents).where(t.subagents.c.parent_session_id == parent_session_id)
             .order_by(t.subagents.c.created_at))
    return (await conn.execute(query)).all()


async def children_of_run(conn: AsyncConnection, parent_run_id: str) -> Sequence[Row]:
    query = (sa.select(t.subagents).where(t.subagents.c.parent_run_id == parent_run_id)
             .order_by(t.subagents.c.created_at))
    return (await conn.execute(query)).all()


async def unannounced_subagents(conn: AsyncConnection) -> Sequence[Row]:
    return (await conn.execute(sa.select(t.subagents).where(t.subagents.c.announced_at.is_(None)))).all()


async def latest_run(conn: AsyncConnection, session_id: str) -> Row | None:
    query = (sa.select(t.runs).where(t.runs.c.session_id == session_id)
             .order_by(t.runs.c.created_at.desc(), t.runs.c.position.desc()).limit(1))
    return (await conn.execute(query)).first()


async def update_subagent(conn: AsyncConnection, child_session_id: str, **values: Any) -> None:
    await conn.execute(t.subagents.update().where(t.subagents.c.child_session_id == child_session_id)
                       .values(**values))


# --- events -------------------------------------------------------------------------

async def events_after(
    conn: AsyncConnection, session_id: str, after: int, *, run_id: str | None = None, limit: int = 1000
) -> list[Event]:
    query = (
        sa.select(t.events)
        .where(t.events.c.session_id == session_id, t.events.c.seq > after)
        .order_by(t.events.c.seq)
        .limit(limit)
    )
    if run_id is not None:
        query = query.where(t.events.c.run_id == run_id)
    return [Event.from_row(row) for row in (await conn.execute(query)).all()]


# --- approvals ----------------------------------------------------------------------





async def approvals_of_run(conn: AsyncConnection, run_id: str) -> Sequence[Row]:
    query = sa.select(t.approvals).where(t.approvals.c.run_id == run_id).order_by(t.approvals.c.created_at)
    return (await conn.execute(query)).all()


async def pending_approvals(conn: AsyncConnection) -> Sequence[Row]:
    query = sa.select(t.approvals).where(t.approvals.c.status == ApprovalStatus.PENDING.value)
    return (await conn.execute(query)).all()
