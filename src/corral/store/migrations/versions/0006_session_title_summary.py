"""Sessions get a title and a rolling summary, written by the reflector after runs.

Exists because listings of many sessions need something readable to show, and a long
conversation benefits from a short account of itself; both are produced in the background
by the session's own agent and never delay its runs.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("title", sa.String(200), nullable=True))
        batch.add_column(sa.Column("summary", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("summary")
        batch.drop_column("title")
