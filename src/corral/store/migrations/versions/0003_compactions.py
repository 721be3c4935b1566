"""Compactions: summaries that stand in for a session's older messages in the model's context.

Exists because a long session outgrows its model's context window; the summary replaces
the messages up to ``through_message_id`` when the context is built, while the messages
themselves stay in the store, untouched, for the record and for the API.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("through_message_id", sa.Integer(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_compactions"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_compactions_session_id_sessions"),
    )
    op.create_index("ix_compactions_session_id_id", "compactions", ["session_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_compactions_session_id_id", table_name="compactions")
    op.drop_table("compactions")
