"""Sessions belong to a principal, and session keys are unique per principal.

Exists because API tokens now map to principals that must not see each other's
sessions; a key shared across principals would hand one principal's session to
another. Sessions created before this revision belong to ``local``, the principal
of a service without tokens.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("owner", sa.String(64), nullable=False, server_default="local"))
        batch.drop_constraint("uq_sessions_key", type_="unique")
        batch.create_unique_constraint("uq_sessions_owner_key", ["owner", "key"])
        batch.create_index("ix_sessions_owner_created_at", ["owner", "created_at"])
    with op.batch_alter_table("sessions") as batch:
        batch.alter_column("owner", server_default=None, existing_type=sa.String(64), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_owner_created_at")
        batch.drop_constraint("uq_sessions_owner_key", type_="unique")
        batch.create_unique_constraint("uq_sessions_key", ["key"])
        batch.drop_column("owner")
