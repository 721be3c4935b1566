"""Nodes, and which node's lane each session lives in.

Exists because several `corral serve` processes may share one Postgres database: each is a
node with a heartbeat (a node whose heartbeat is older than the lease is dead), and each
session's lane lives on exactly one live node, recorded here so that every node can tell
where to forward a write and which sessions a dead node leaves behind. On SQLite (one
process) the columns stay empty.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("url", sa.String(512), nullable=False),
        sa.Column("incarnation", sa.Integer, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
    )
    op.create_index("ix_nodes_url", "nodes", ["url"])
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("node_id", sa.String(40), nullable=True))
    op.create_index("ix_sessions_node_id", "sessions", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_sessions_node_id", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("node_id")
    op.drop_index("ix_nodes_url", table_name="nodes")
    op.drop_table("nodes")
