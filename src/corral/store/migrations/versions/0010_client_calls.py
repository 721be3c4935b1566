"""Client tools: the tools a client's request brings, and the calls of them a run waits on.

Exists because the OpenAI endpoints offer a request's own ``tools`` to the model for that run,
and a call of one is answered by the client, in a later request: the run parks in `waiting`
(holding nothing) until then, across restarts too. ``runs.model_options`` keeps what the request
added to the run's model calls (its tools, ``tool_choice``, ``response_format``), so a run that is
re-queued or resumed after a restart offers the same; ``client_calls`` keeps each call the client
owes a result for, indexed by call id, since a client that pins no session is found by the ids
of the calls it answers.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ALTER TABLE on both backends: a batch copy of `runs` on SQLite could lose the partial
    # unique index that keeps one active run per session.
    op.add_column("runs", sa.Column("model_options", sa.JSON, nullable=True))
    op.create_table(
        "client_calls",
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("tool", sa.String(128), nullable=False),
        sa.Column("arguments", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("answered_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("run_id", "call_id", name="pk_client_calls"),
    )
    op.create_index("ix_client_calls_call_id", "client_calls", ["call_id"])


def downgrade() -> None:
    op.drop_index("ix_client_calls_call_id", table_name="client_calls")
    op.drop_table("client_calls")
    op.drop_column("runs", "model_options")  # SQLite 3.35+ drops a column in place
