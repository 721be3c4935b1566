"""Alembic environment: runs on a connection the store hands in (never its own engine)."""

from __future__ import annotations

from alembic import context

from corral.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
