"""Row-level reads and writes: synchronous functions of a connection that never commit.

The caller owns the transaction: the writer's batch, or one ``Store.read`` (which runs
a whole function like these in one hand-off, so a read that needs two queries is one
function here, not two reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.events import Event
from corral.store import tables as t
from corral.types import ACTIVE_STATUSES, ApprovalStatus, RunStatus

Row = sa.Row[Any]
NON_TERMINAL = [RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.WAITING.value]


# --- agents -------------------------------------------------------------------------

def insert_agent(conn: Connection, name: str, config: dict[str, Any], now: datetime) -> None:
    conn.execute(t.agents.insert().values(name=name, config=config, created_at=now))


def delete_agent(conn: Connection, name: str) -> None:
    conn.execute(t.agents.delete().where(t.agents.c.name == name))


def all_agents(conn: Connection) -> Sequence[Row]:
    return conn.execute(sa.select(t.agents).order_by(t.agents.c.created_at)).all()


# --- sessions -----------------------------------------------------------------------

def insert_session(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(t.sessions.insert().values(**row))


def get_session(conn: Connection, session_id: str) -> Row | None:
    return conn.execute(sa.select(t.sessions).where(t.sessions.c.id == session_id)).first()


def update_session(conn: Connection, session_id: str, **values: Any) -> None:
    conn.execute(t.sessions.update().where(t.sessions.c.id == session_id).values(**values))


def completed_runs_count(conn: Connection, session_id: str) -> int:
    query = sa.select(sa.func.count()).select_from(t.runs).where(
        t.runs.c.session_id == session_id, t.runs.c.status == RunStatus.COMPLETED.value)
    return int(conn.execute(query).scalar() or 0)


def session_owner(conn: Connection, session_id: str) -> str | None:
    return conn.execute(sa.select(t.sessions.c.owner).where(t.sessions.c.id == session_id)).scalar()


def get_session_by_key(conn: Connection, owner: str, key: str) -> Row | None:
    query = sa.select(t.sessions).where(t.sessions.c.owner == owner, t.sessions.c.key == key)
    return conn.execute(query).first()


def list_sessions(
    conn: Connection, *, owner: str | None, agent: str | None, limit: int, offset: int
) -> Sequence[Row]:
    """Newest first; ``owner=None`` lists every principal's sessions."""
    query = sa.select(t.sessions).order_by(t.sessions.c.created_at.desc(), t.sessions.c.id.desc())
    if owner is not None:
        query = query.where(t.sessions.c.owner == owner)
    if agent is not None:
        query = query.where(t.sessions.c.agent == agent)
    return conn.execute(query.limit(limit).offset(offset)).all()


def session_counters(conn: Connection, session_id: str) -> tuple[int, float]:
    """The last input seq and the largest run position of a session (0 when new)."""
    seq = conn.execute(
        sa.select(sa.func.max(t.inputs.c.seq)).where(t.inputs.c.session_id == session_id)
    ).scalar()
    pos = conn.execute(
        sa.select(sa.func.max(t.runs.c.position)).where(t.runs.c.session_id == session_id)
    ).scalar()
    return int(seq or 0), float(pos or 0.0)


def last_event_seqs(conn: Connection, session_ids: Sequence[str]) -> dict[str, int]:
    """Each session's newest event seq (absent: no event yet), for clients that follow "from now"."""
    if not session_ids:
        return {}
    # One index probe per session (the primary key is (session_id, seq)), not a scan of every event.
    newest = (sa.select(sa.func.max(t.events.c.seq)).where(t.events.c.session_id == t.sessions.c.id)
              .scalar_subquery())
    query = sa.select(t.sessions.c.id, newest).where(t.sessions.c.id.in_(session_ids))
    return {sid: int(seq) for sid, seq in conn.execute(query).all() if seq is not None}


def session_state(conn: Connection, session_id: str) -> tuple[Row | None, tuple[int, float], int]:
    """What loading a session's runtime needs: its row, its counters and its completed runs."""
    return get_session(conn, session_id), session_counters(conn, session_id), completed_runs_count(conn, session_id)


def sessions_page(
    conn: Connection, *, owner: str | None, agent: str | None, limit: int, offset: int
) -> tuple[Sequence[Row], dict[str, int]]:
    """A page of ``list_sessions`` and the newest event seq of each."""
    rows = list_sessions(conn, owner=owner, agent=agent, limit=limit, offset=offset)
    return rows, last_event_seqs(conn, [row.id for row in rows])


def session_detail(conn: Connection, session_id: str) -> tuple[dict[str, int], Row | None, Sequence[Row]]:
    """A session's newest event seq, its parent link (if a subagent's) and its children."""
    return last_event_seqs(conn, [session_id]), subagent_link(conn, session_id), children_of_session(conn, session_id)


# --- inputs and runs ----------------------------------------------------------------

def insert_run(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(t.runs.insert().values(**row))


def update_run(conn: Connection, run_id: str, **values: Any) -> None:
    conn.execute(t.runs.update().where(t.runs.c.id == run_id).values(**values))


def get_run(conn: Connection, run_id: str) -> Row | None:
    return conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()


def list_runs(
    conn: Connection,
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
    return conn.execute(query.limit(limit).offset(offset)).all()


def run_and_owner(conn: Connection, run_id: str) -> tuple[Row | None, str | None]:
    """A run and the owner of its session (None and None when there is no such run)."""
    row = get_run(conn, run_id)
    return row, None if row is None else session_owner(conn, row.session_id)


def unfinished_work(
    conn: Connection, session_id: str | None = None
) -> tuple[list[Row], Sequence[Row], Sequence[Row]]:
    """What recovery starts from: unfinished runs, their inputs, and pending approvals (of one
    session, or of all)."""
    runs = list(unfinished_runs(conn, session_id))
    return runs, inputs_of_runs(conn, [r.id for r in runs]), pending_approvals(conn, session_id)


def unfinished_runs(conn: Connection, session_id: str | None = None) -> Sequence[Row]:
    query = sa.select(t.runs).where(t.runs.c.status.in_(NON_TERMINAL)).order_by(t.runs.c.position)
    if session_id is not None:
        query = query.where(t.runs.c.session_id == session_id)
    return conn.execute(query).all()


def inputs_of_runs(conn: Connection, run_ids: Sequence[str]) -> Sequence[Row]:
    if not run_ids:
        return []
    query = sa.select(t.inputs).where(t.inputs.c.run_id.in_(run_ids)).order_by(t.inputs.c.seq)
    return conn.execute(query).all()


def input_by_idempotency_key(conn: Connection, session_id: str, key: str) -> Row | None:
    query = sa.select(t.inputs).where(
        t.inputs.c.session_id == session_id, t.inputs.c.idempotency_key == key
    )
    return conn.execute(query).first()


def count_active_runs(conn: Connection, session_id: str) -> int:
    query = sa.select(sa.func.count()).select_from(t.runs).where(
        t.runs.c.session_id == session_id, t.runs.c.status.in_([s.value for s in ACTIVE_STATUSES])
    )
    return int(conn.execute(query).scalar() or 0)


# --- messages -----------------------------------------------------------------------

def insert_messages(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(t.messages.insert(), rows)


# Built once: every run reads its session's new messages with this, and building a statement
# (and its cache key) cost more of the reader thread's time than running it.
_MESSAGES_AFTER = (sa.select(t.messages)
                   .where(t.messages.c.session_id == sa.bindparam("session_id"),
                          t.messages.c.id > sa.bindparam("after_id"))
                   .order_by(t.messages.c.id))
_LIVE_MESSAGES_AFTER = _MESSAGES_AFTER.where(t.messages.c.rolled_back.is_(False))


def session_messages(
    conn: Connection, session_id: str, *, include_rolled_back: bool, after_id: int = 0
) -> Sequence[Row]:
    """The session's messages in order; ``after_id`` skips those a compaction summarised."""
    query = _MESSAGES_AFTER if include_rolled_back else _LIVE_MESSAGES_AFTER
    return conn.execute(query, {"session_id": session_id, "after_id": after_id}).all()


def latest_compaction(conn: Connection, session_id: str) -> Row | None:
    query = (sa.select(t.compactions).where(t.compactions.c.session_id == session_id)
             .order_by(t.compactions.c.id.desc()).limit(1))
    return conn.execute(query).first()


def conversation(conn: Connection, session_id: str) -> tuple[Row | None, Sequence[Row]]:
    """What a run's context is built from: the latest compaction and the messages it does not
    summarise (rolled-back ones left out). ``kernel.conversations`` reads it once per session,
    then only the messages after the last it knows."""
    compaction = latest_compaction(conn, session_id)
    after = compaction.through_message_id if compaction is not None else 0
    return compaction, session_messages(conn, session_id, include_rolled_back=False, after_id=after)


# --- jobs ---------------------------------------------------------------------------

def all_jobs(conn: Connection) -> Sequence[Row]:
    return conn.execute(sa.select(t.jobs).order_by(t.jobs.c.created_at)).all()


def list_jobs(conn: Connection, *, owner: str | None) -> Sequence[Row]:
    query = sa.select(t.jobs).order_by(t.jobs.c.created_at.desc(), t.jobs.c.id)
    if owner is not None:
        query = query.where(t.jobs.c.owner == owner)
    return conn.execute(query).all()


def get_job(conn: Connection, job_id: str) -> Row | None:
    return conn.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id)).first()


def job_fires(conn: Connection, job_id: str) -> Sequence[Row]:
    query = sa.select(t.job_fires).where(t.job_fires.c.job_id == job_id).order_by(t.job_fires.c.fire_at)
    return conn.execute(query).all()


def advance_job(conn: Connection, job_id: str, **values: Any) -> None:
    conn.execute(t.jobs.update().where(t.jobs.c.id == job_id).values(**values))


def delete_job(conn: Connection, job_id: str) -> None:
    conn.execute(t.jobs.delete().where(t.jobs.c.id == job_id))


# --- subagents ---------------------------------------------------------------------

def subagent_link(conn: Connection, child_session_id: str) -> Row | None:
    query = sa.select(t.subagents).where(t.subagents.c.child_session_id == child_session_id)
    return conn.execute(query).first()


def children_of_session(conn: Connection, parent_session_id: str) -> Sequence[Row]:
    query = (sa.select(t.subagents).where(t.subagents.c.parent_session_id == parent_session_id)
             .order_by(t.subagents.c.created_at))
    return conn.execute(query).all()


def children_of_run(conn: Connection, parent_run_id: str) -> Sequence[Row]:
    query = (sa.select(t.subagents).where(t.subagents.c.parent_run_id == parent_run_id)
             .order_by(t.subagents.c.created_at))
    return conn.execute(query).all()


def unannounced_subagents(conn: Connection) -> Sequence[Row]:
    return conn.execute(sa.select(t.subagents).where(t.subagents.c.announced_at.is_(None))).all()


def latest_run(conn: Connection, session_id: str) -> Row | None:
    query = (sa.select(t.runs).where(t.runs.c.session_id == session_id)
             .order_by(t.runs.c.created_at.desc(), t.runs.c.position.desc()).limit(1))
    return conn.execute(query).first()


def update_subagent(conn: Connection, child_session_id: str, **values: Any) -> None:
    conn.execute(t.subagents.update().where(t.subagents.c.child_session_id == child_session_id)
                       .values(**values))


# --- events -------------------------------------------------------------------------

def events_after(
    conn: Connection, session_id: str, after: int, *, run_id: str | None = None, limit: int = 1000
) -> list[Event]:
    query = (
        sa.select(t.events)
        .where(t.events.c.session_id == session_id, t.events.c.seq > after)
        .order_by(t.events.c.seq)
        .limit(limit)
    )
    if run_id is not None:
        query = query.where(t.events.c.run_id == run_id)
    return [Event.from_row(row) for row in conn.execute(query).all()]


# --- approvals ----------------------------------------------------------------------


def approvals_of_run(conn: Connection, run_id: str) -> Sequence[Row]:
    query = sa.select(t.approvals).where(t.approvals.c.run_id == run_id).order_by(t.approvals.c.created_at)
    return conn.execute(query).all()


def pending_approvals(conn: Connection, session_id: str | None = None) -> Sequence[Row]:
    query = sa.select(t.approvals).where(t.approvals.c.status == ApprovalStatus.PENDING.value)
    if session_id is not None:
        query = query.where(t.approvals.c.session_id == session_id)
    return conn.execute(query).all()


# --- client calls -------------------------------------------------------------------


def unanswered_client_calls(conn: Connection, run_ids: Sequence[str]) -> Sequence[Row]:
    """The calls of client tools that these runs still wait on, oldest first."""
    if not run_ids:
        return []
    query = (sa.select(t.client_calls)
             .where(t.client_calls.c.run_id.in_(run_ids), t.client_calls.c.answered_at.is_(None))
             .order_by(t.client_calls.c.created_at))
    return conn.execute(query).all()


def client_calls_by_id(conn: Connection, call_ids: Sequence[str]) -> Sequence[Row]:
    """Client calls with these ids, answered or not, with their run's status and their session's
    owner and agent (a call id names a run for a client that pins no session)."""
    if not call_ids:
        return []
    query = (
        sa.select(t.client_calls, t.runs.c.status.label("run_status"), t.sessions.c.owner, t.sessions.c.agent)
        .join(t.runs, t.runs.c.id == t.client_calls.c.run_id)
        .join(t.sessions, t.sessions.c.id == t.client_calls.c.session_id)
        .where(t.client_calls.c.call_id.in_(call_ids))
    )
    return conn.execute(query).all()


def last_event_seq(conn: Connection, session_id: str) -> int:
    """The session's newest event seq (0: none yet)."""
    query = sa.select(sa.func.max(t.events.c.seq)).where(t.events.c.session_id == session_id)
    return int(conn.execute(query).scalar() or 0)
