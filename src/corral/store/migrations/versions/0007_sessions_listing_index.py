"""An index for listing every principal's sessions, newest first.

Exists because an admin's `GET /v1/sessions` is ordered by creation time without an owner
to narrow it: with 100,000 sessions the listing sorted the whole table (about 100 ms) to
return its first page. The owner's own listing already had an index.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sessions_created_at_id", "sessions", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_sessions_created_at_id", table_name="sessions")
