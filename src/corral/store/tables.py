"""The schema, as SQLAlchemy Core tables shared by SQLite and Postgres.

Migrations (``migrations/versions``) create exactly this; a test compares the two.
Constraint names follow one naming convention so migrations can refer to them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from corral.text import clean

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC, whatever the backend stores.

    SQLite keeps no zone; reading back a naive value would make comparisons with
    aware values raise, so the zone is attached on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class StoredString(TypeDecorator[str]):
    """A ``VARCHAR`` whose values are made storable on both backends (``corral.text.clean``):
    a NUL would be refused by Postgres alone, and a lone surrogate by both drivers. Lookups
    go through it too, so an id with ``%00`` in a URL finds nothing instead of failing."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else clean(value)


class StoredText(StoredString):
    impl = sa.Text
    cache_ok = True


# None is SQL NULL on both backends (plain sa.JSON stores the JSON text 'null' on SQLite,
# so ``IS NULL`` would mean different things per backend).
JSON: Any = sa.JSON(none_as_null=True)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("name", StoredString(64), primary_key=True),
    sa.Column("config", JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", StoredString(40), primary_key=True),
    sa.Column("agent", StoredString(64), nullable=False),
    # The principal that created the session; only it (and admins) may see or touch it.
    sa.Column("owner", StoredString(64), nullable=False),
    sa.Column("key", StoredString(256), nullable=True),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Written by the reflector in the background: a short title, and a rolling summary.
    sa.Column("title", StoredString(200), nullable=True),
    sa.Column("summary", StoredText, nullable=True),
    # The node whose lane the session lives in (a cluster on Postgres); None: nobody's yet,
    # or freed by a node that left or died. Always None on SQLite, where there is one node.
    sa.Column("node_id", StoredString(40), nullable=True),
    # Keys are per principal: two principals' "main" are two sessions.
    sa.UniqueConstraint("owner", "key"),
    sa.Index("ix_sessions_owner_created_at", "owner", "created_at"),
    # An admin's listing of everyone's sessions, newest first, without sorting the table.
    sa.Index("ix_sessions_created_at_id", "created_at", "id"),
    sa.Index("ix_sessions_node_id", "node_id"),
)

# The processes sharing a Postgres database (DESIGN.md section 6). Times are the database's own
# clock, so nodes never compare their clocks with each other.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", StoredString(40), primary_key=True),
    sa.Column("url", StoredString(512), nullable=False),
    # How many nodes had this URL before this one: its earlier incarnations.
    sa.Column("incarnation", sa.Integer, nullable=False),
    # live | left (shut down, its sessions released) | dead (taken over: fenced)
    sa.Column("state", StoredString(8), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Index("ix_nodes_url", "url"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", StoredString(40), primary_key=True),
    sa.Column("session_id", StoredString(40), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("status", StoredString(16), nullable=False),
    # Order within the session's queue; fractional so a run can be put in front.
    sa.Column("position", sa.Float, nullable=False),
    sa.Column("policy", StoredString(16), nullable=False),
    sa.Column("collect", sa.Boolean, nullable=False),
    sa.Column("output", StoredText, nullable=True),
    sa.Column("error", JSON, nullable=True),
    sa.Column("usage", JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    # What the client's request adds to the run's model calls: its own tools, tool_choice,
    # response_format (``ModelOptions.as_json``); None for a run whose request brought none.
    sa.Column("model_options", JSON, nullable=True),
    sa.Index("ix_runs_session_id_created_at", "session_id", "created_at"),
    sa.Index("ix_runs_status", "status"),
    # Invariant 1 as a database fact: one running-or-waiting run per session.
    sa.Index(
        "uq_runs_one_active_per_session",
        "session_id",
        unique=True,
        sqlite_where=sa.text("status IN ('running', 'waiting')"),
        postgresql_where=sa.text("status IN ('running', 'waiting')"),
    ),
)

inputs = sa.Table(
    "inputs",
    metadata,
    sa.Column("id", StoredString(40), primary_key=True),
    sa.Column("session_id", StoredString(40), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("run_id", StoredString(40), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("content", StoredText, nullable=False),
    sa.Column("mode", StoredString(16), nullable=False),
    sa.Column("disposition", StoredString(16), nullable=False),
    sa.Column("status", StoredString(16), nullable=False),
    sa.Column("origin", StoredString(32), nullable=False),
    sa.Column("idempotency_key", StoredString(256), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("session_id", "seq"),
    sa.UniqueConstraint("session_id", "idempotency_key"),
    sa.Index("ix_inputs_run_id", "run_id"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", StoredString(40), nullable=False),
    sa.Column("run_id", StoredString(40), nullable=False),
    sa.Column("input_id", StoredString(40), nullable=True),
    sa.Column("role", StoredString(16), nullable=False),
    sa.Column("content", StoredText, nullable=False),
    sa.Column("tool_calls", JSON, nullable=True),
    sa.Column("tool_call_id", StoredString(64), nullable=True),
    sa.Column("rolled_back", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_messages_session_id_id", "session_id", "id"),
    sa.Index("ix_messages_run_id", "run_id"),
)

compactions = sa.Table(
    "compactions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", StoredString(40), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("run_id", StoredString(40), nullable=False),
    # The summary stands in for every message of the session with an id up to this one.
    sa.Column("through_message_id", sa.Integer, nullable=False),
    sa.Column("summary", StoredText, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_compactions_session_id_id", "session_id", "id"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", StoredString(40), primary_key=True),
    sa.Column("owner", StoredString(64), nullable=False),
    sa.Column("agent", StoredString(64), nullable=False),
    # None: every fire gets a fresh session of its own.
    sa.Column("session_id", StoredString(40), sa.ForeignKey("sessions.id"), nullable=True),
    sa.Column("schedule", JSON, nullable=False),
    sa.Column("message", StoredText, nullable=False),
    sa.Column("overlap", StoredString(16), nullable=False),
    sa.Column("misfire", StoredString(16), nullable=False),
    # None once a schedule has no more fires (a past `at`).
    sa.Column("next_fire_at", UTCDateTime, nullable=True),
    sa.Column("last_fire_at", UTCDateTime, nullable=True),
    sa.Column("last_run_id", StoredString(40), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_jobs_owner_created_at", "owner", "created_at"),
)

job_fires = sa.Table(
    "job_fires",
    metadata,
    # One row per due time: the key that keeps a crash from firing twice.
    sa.Column("job_id", StoredString(40), primary_key=True),
    sa.Column("fire_at", UTCDateTime, primary_key=True),
    sa.Column("status", StoredString(16), nullable=False),
    sa.Column("session_id", StoredString(40), nullable=True),
    sa.Column("run_id", StoredString(40), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

subagents = sa.Table(
    "subagents",
    metadata,
    sa.Column("child_session_id", StoredString(40), sa.ForeignKey("sessions.id"), primary_key=True),
    sa.Column("parent_session_id", StoredString(40), nullable=False),
    sa.Column("parent_run_id", StoredString(40), nullable=False),
    sa.Column("depth", sa.Integer, nullable=False),
    sa.Column("task", StoredText, nullable=False),
    # How the child's work ended, once it has: its run status and its output (or error).
    sa.Column("status", StoredString(16), nullable=True),
    sa.Column("result", StoredText, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set after the announce entered the parent session; until then a restart announces again.
    sa.Column("announced_at", UTCDateTime, nullable=True),
    sa.Index("ix_subagents_parent_session_id", "parent_session_id"),
    sa.Index("ix_subagents_parent_run_id", "parent_run_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("session_id", StoredString(40), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run_id", StoredString(40), nullable=True),
    sa.Column("type", StoredString(32), nullable=False),
    sa.Column("data", JSON, nullable=False),
    sa.Column("ts", UTCDateTime, nullable=False),
    sa.Index("ix_events_run_id_seq", "run_id", "seq"),
)

# Calls of a client's own tools (the OpenAI endpoints' ``tools``): the run waits in `waiting`
# until the client sends each result back (``answered_at``), found by its call id.
client_calls = sa.Table(
    "client_calls",
    metadata,
    sa.Column("run_id", StoredString(40), primary_key=True),
    sa.Column("call_id", StoredString(64), primary_key=True),
    sa.Column("session_id", StoredString(40), nullable=False),
    sa.Column("tool", StoredString(128), nullable=False),
    sa.Column("arguments", JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("answered_at", UTCDateTime, nullable=True),
    sa.Index("ix_client_calls_call_id", "call_id"),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("run_id", StoredString(40), primary_key=True),
    sa.Column("call_id", StoredString(64), primary_key=True),
    sa.Column("session_id", StoredString(40), nullable=False),
    sa.Column("tool", StoredString(128), nullable=False),
    sa.Column("arguments", JSON, nullable=False),
    sa.Column("status", StoredString(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("resolved_at", UTCDateTime, nullable=True),
)

# --- chat channels (corral/channels, docs/channels.md) ---------------------------------------

# Each chat's current session (``/new`` moves it on) and its arrival mode (``/mode``).
channel_chats = sa.Table(
    "channel_chats",
    metadata,
    sa.Column("channel", StoredString(32), primary_key=True),
    # The chat's scope (chat[:thread], a DM's user, or the channel's shared DMs): one session each.
    sa.Column("chat_key", StoredString(256), primary_key=True),
    sa.Column("session_id", StoredString(40), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("mode", StoredString(16), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Platform messages already taken in: a redelivered update is recognised and never runs twice.
channel_inbound = sa.Table(
    "channel_inbound",
    metadata,
    sa.Column("channel", StoredString(32), primary_key=True),
    sa.Column("message_key", StoredString(256), primary_key=True),
    sa.Column("session_id", StoredString(40), nullable=True),
    sa.Column("run_id", StoredString(40), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_channel_inbound_created_at", "created_at"),
)

# Runs whose reply a channel owes a chat; ``open`` until every chunk of the reply is in the outbox.
channel_runs = sa.Table(
    "channel_runs",
    metadata,
    sa.Column("run_id", StoredString(40), primary_key=True),
    sa.Column("channel", StoredString(32), nullable=False),
    sa.Column("chat_id", StoredString(128), nullable=False),
    sa.Column("thread_id", StoredString(128), nullable=True),
    sa.Column("session_id", StoredString(40), nullable=False),
    sa.Column("reply_to", StoredString(128), nullable=True),
    sa.Column("status", StoredString(8), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_channel_runs_channel_status", "channel", "status"),
)

# The durable outbox: every chunk and edit is a row, with its idempotency key, before it is sent.
channel_outbox = sa.Table(
    "channel_outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel", StoredString(32), nullable=False),
    sa.Column("key", StoredString(256), nullable=False),
    sa.Column("chat_id", StoredString(128), nullable=False),
    sa.Column("thread_id", StoredString(128), nullable=True),
    # send | edit | answer (a button press acknowledged)
    sa.Column("kind", StoredString(16), nullable=False),
    # An edit's message: the key of the send row that created it.
    sa.Column("target", StoredString(256), nullable=True),
    sa.Column("text", StoredText, nullable=False),
    sa.Column("extra", JSON, nullable=True),
    # pending | sent | failed | superseded (an edit a later edit of the same message replaced)
    sa.Column("status", StoredString(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("platform_id", StoredString(128), nullable=True),
    sa.Column("error", StoredText, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("channel", "key"),
    sa.Index("ix_channel_outbox_channel_status_id", "channel", "status", "id"),
)
