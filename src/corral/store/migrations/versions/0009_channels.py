"""Chat channels: each chat's session, the platform messages taken in, the replies owed, the outbox.

Exists because a chat channel must survive a crash without losing or doubling anything:
a redelivered platform message is recognised (``channel_inbound``), a run whose reply was
not yet fully queued is followed again after a restart (``channel_runs``), and every chunk
and edit is a row with an idempotency key before it is sent (``channel_outbox``), so a
restart sends what was pending and nothing that was sent. ``channel_chats`` keeps which
session a chat talks to (``/new`` moves it on) and its arrival mode (``/mode``).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "channel_chats",
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("chat_key", sa.String(256), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("channel", "chat_key", name="pk_channel_chats"),
    )
    op.create_table(
        "channel_inbound",
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("message_key", sa.String(256), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=True),
        sa.Column("run_id", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("channel", "message_key", name="pk_channel_inbound"),
    )
    op.create_index("ix_channel_inbound_created_at", "channel_inbound", ["created_at"])
    op.create_table(
        "channel_runs",
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        sa.Column("thread_id", sa.String(128), nullable=True),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("reply_to", sa.String(128), nullable=True),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_channel_runs"),
    )
    op.create_index("ix_channel_runs_channel_status", "channel_runs", ["channel", "status"])
    op.create_table(
        "channel_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        sa.Column("thread_id", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(256), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("platform_id", sa.String(128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("sent_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_channel_outbox"),
        sa.UniqueConstraint("channel", "key", name="uq_channel_outbox_channel_key"),
    )
    op.create_index("ix_channel_outbox_channel_status_id", "channel_outbox", ["channel", "status", "id"])


def downgrade() -> None:
    op.drop_index("ix_channel_outbox_channel_status_id", table_name="channel_outbox")
    op.drop_table("channel_outbox")
    op.drop_index("ix_channel_runs_channel_status", table_name="channel_runs")
    op.drop_table("channel_runs")
    op.drop_index("ix_channel_inbound_created_at", table_name="channel_inbound")
    op.drop_table("channel_inbound")
    op.drop_table("channel_chats")
