"""Jobs and their fires: schedules that wake agents, kept across restarts.

Exists because scheduled work must survive a crash: a job's next due time is stored, and
each fire is recorded under (job, due time) so a restart between enqueueing a fire and
recording it repeats the same idempotent enqueue instead of firing twice.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=True),
        sa.Column("schedule", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("overlap", sa.String(16), nullable=False),
        sa.Column("misfire", sa.String(16), nullable=False),
        sa.Column("next_fire_at", TS, nullable=True),
        sa.Column("last_fire_at", TS, nullable=True),
        sa.Column("last_run_id", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_jobs_session_id_sessions"),
    )
    op.create_index("ix_jobs_owner_created_at", "jobs", ["owner", "created_at"])
    op.create_table(
        "job_fires",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("fire_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=True),
        sa.Column("run_id", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "fire_at", name="pk_job_fires"),
    )


def downgrade() -> None:
    op.drop_table("job_fires")
    op.drop_index("ix_jobs_owner_created_at", table_name="jobs")
    op.drop_table("jobs")
