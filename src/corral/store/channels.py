"""Row-level reads and writes of the chat channels' tables (``corral.channels``).

Like ``repo``: synchronous functions of a connection that never commit; the caller (the
writer's batch, or one ``Store.read``) owns the transaction. Inserts that may repeat (a
reply rebuilt after a restart, a redelivered message) insert only what is new, by the
table's key, and say which rows that was.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from corral.store import tables as t

Row = sa.Row[Any]
OPEN, DONE = "open", "done"
PENDING, SENT, FAILED, SUPERSEDED = "pending", "sent", "failed", "superseded"


def _insert_new(conn: Connection, table: sa.Table, row: dict[str, Any]) -> bool:
    """Insert ``row`` unless a row with its key (any unique constraint) exists; whether it did.
    ``ON CONFLICT DO NOTHING`` is spelt alike by both backends, but built by each dialect's own."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    return bool(conn.execute(insert.values(**row).on_conflict_do_nothing()).rowcount)


# --- chats ---------------------------------------------------------------------------------

def get_chat(conn: Connection, channel: str, chat_key: str) -> Row | None:
    c = t.channel_chats.c
    return conn.execute(sa.select(t.channel_chats).where(c.channel == channel, c.chat_key == chat_key)).first()


def put_chat(conn: Connection, row: dict[str, Any]) -> None:
    """Create the chat's row, or set its session, generation and mode."""
    c = t.channel_chats.c
    if not _insert_new(conn, t.channel_chats, row):
        values = {k: v for k, v in row.items() if k not in ("channel", "chat_key")}
        conn.execute(t.channel_chats.update().where(c.channel == row["channel"], c.chat_key == row["chat_key"])
                     .values(**values))


def chat_count(conn: Connection, channel: str) -> int:
    query = sa.select(sa.func.count()).select_from(t.channel_chats).where(t.channel_chats.c.channel == channel)
    return int(conn.execute(query).scalar() or 0)


# --- inbound messages ----------------------------------------------------------------------

def inbound_seen(conn: Connection, channel: str, message_key: str) -> bool:
    c = t.channel_inbound.c
    query = sa.select(c.message_key).where(c.channel == channel, c.message_key == message_key)
    return conn.execute(query).first() is not None


def record_inbound(conn: Connection, channel: str, message_key: str, session_id: str | None, run_id: str | None,
                   now: datetime) -> bool:
    return _insert_new(conn, t.channel_inbound, {"channel": channel, "message_key": message_key,
                                                 "session_id": session_id, "run_id": run_id, "created_at": now})


# --- runs whose reply is owed ----------------------------------------------------------------

def add_run(conn: Connection, row: dict[str, Any]) -> bool:
    return _insert_new(conn, t.channel_runs, {"status": OPEN, **row})


def get_run(conn: Connection, run_id: str) -> Row | None:
    return conn.execute(sa.select(t.channel_runs).where(t.channel_runs.c.run_id == run_id)).first()


def open_runs(conn: Connection, channel: str) -> Sequence[Row]:
    c = t.channel_runs.c
    query = sa.select(t.channel_runs).where(c.channel == channel, c.status == OPEN).order_by(c.created_at)
    return conn.execute(query).all()


def close_run(conn: Connection, run_id: str) -> None:
    conn.execute(t.channel_runs.update().where(t.channel_runs.c.run_id == run_id).values(status=DONE))


# --- the outbox -------------------------------------------------------------------------------

def add_outbox(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Insert the rows whose key is new; their keys (a rebuilt reply's rows are there already)."""
    added = []
    for row in rows:
        if _insert_new(conn, t.channel_outbox, {"status": PENDING, "attempts": 0, **row}):
            added.append(row["key"])
    return added


def pending_outbox(conn: Connection, channel: str) -> Sequence[Row]:
    c = t.channel_outbox.c
    return conn.execute(sa.select(t.channel_outbox).where(c.channel == channel, c.status == PENDING)
                        .order_by(c.id)).all()


def outbox_row(conn: Connection, channel: str, key: str) -> Row | None:
    c = t.channel_outbox.c
    return conn.execute(sa.select(t.channel_outbox).where(c.channel == channel, c.key == key)).first()


def mark_outbox(conn: Connection, channel: str, keys: Sequence[str], **values: Any) -> None:
    c = t.channel_outbox.c
    conn.execute(t.channel_outbox.update().where(c.channel == channel, c.key.in_(list(keys))).values(**values))


def outbox_rows(conn: Connection, channel: str, status: str | None, limit: int) -> Sequence[Row]:
    c = t.channel_outbox.c
    query = sa.select(t.channel_outbox).where(c.channel == channel)
    if status is not None:
        query = query.where(c.status == status)
    return conn.execute(query.order_by(c.id.desc()).limit(limit)).all()


def outbox_counts(conn: Connection, channel: str) -> dict[str, int]:
    c = t.channel_outbox.c
    query = sa.select(c.status, sa.func.count()).where(c.channel == channel).group_by(c.status)
    return {status: int(count) for status, count in conn.execute(query).all()}


# --- pruning --------------------------------------------------------------------------------

def prune(conn: Connection, channel: str, before: datetime) -> None:
    """Forget what no restart needs any more: delivered rows, replies done, messages seen before
    ``before``. Failed deliveries stay, to be looked at."""
    o, r, i = t.channel_outbox.c, t.channel_runs.c, t.channel_inbound.c
    conn.execute(t.channel_outbox.delete().where(o.channel == channel, o.status.in_([SENT, SUPERSEDED]),
                                                 o.created_at < before))
    conn.execute(t.channel_runs.delete().where(r.channel == channel, r.status == DONE, r.created_at < before))
    conn.execute(t.channel_inbound.delete().where(i.channel == channel, i.created_at < before))
