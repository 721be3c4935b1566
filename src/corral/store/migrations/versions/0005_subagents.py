"""Subagents: which session a child session was spawned from, and whether its end was announced.

Exists because the link must outlive the process: after a restart a child keeps running,
and its announce to the parent is still delivered, exactly once (the announce is sent
under a key derived from the child, and ``announced_at`` is set after it).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subagents",
        sa.Column("child_session_id", sa.String(40), nullable=False),
        sa.Column("parent_session_id", sa.String(40), nullable=False),
        sa.Column("parent_run_id", sa.String(40), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("child_session_id", name="pk_subagents"),
        sa.ForeignKeyConstraint(["child_session_id"], ["sessions.id"], name="fk_subagents_child_session_id_sessions"),
    )
    op.create_index("ix_subagents_parent_session_id", "subagents", ["parent_session_id"])
    op.create_index("ix_subagents_parent_run_id", "subagents", ["parent_run_id"])


def downgrade() -> None:
    op.drop_index("ix_subagents_parent_run_id", table_name="subagents")
    op.drop_index("ix_subagents_parent_session_id", table_name="subagents")
    op.drop_table("subagents")
