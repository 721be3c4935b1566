"""The test Postgres server: dropping a database that connections may still hold."""

from __future__ import annotations

import asyncpg


async def drop_database(admin: asyncpg.Connection, name: str) -> None:
    """Drop database ``name`` (if it exists) from ``admin``, a superuser's connection to another
    database, after ending whatever sessions are still open on it: what ``DROP DATABASE ... WITH
    (FORCE)`` does on Postgres 13+, done so that older servers can do it too. New connections are
    refused first, so a pool that reconnects cannot slip in; DROP waits for the terminated ones to go."""
    if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
