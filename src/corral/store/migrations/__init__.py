"""The schema's migrations (alembic), and bringing a database up to the newest one.

Alembic takes a tenth of a second or more to import, and most starts find the database
already at the newest revision (every restart after the first). ``at_head`` reads that
revision from the migration files and the database's from ``alembic_version`` with plain
statements, so that ``Store.migrate`` loads alembic only when some migration is due.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"  # alembic's default, which env.py keeps


@functools.cache
def head_revision() -> str | None:
    """The one revision no other revises, from the files in ``versions/``; None if there is
    not exactly one (then alembic decides)."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in (SCRIPT_LOCATION / "versions").glob("*.py"):
        values = _assignments(path, {"revision", "down_revision"})
        revision, down = values.get("revision"), values.get("down_revision")
        if isinstance(revision, str):
            revisions.add(revision)
        revised.update([down] if isinstance(down, str) else down if isinstance(down, tuple | list) else [])
    heads = revisions - revised
    return next(iter(heads)) if len(heads) == 1 else None


def _assignments(path: Path, names: set[str]) -> dict[str, object]:
    """Module-level ``NAME = literal`` assignments of a file, read without running it."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            if node.target.id in names:
                found[node.target.id] = ast.literal_eval(node.value)
    return found


def current_revision(conn: Connection) -> str | None:
    """The database's revision; None for a new database (or one alembic left on several)."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return None
    versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    return str(versions[0]) if len(versions) == 1 else None


def at_head(conn: Connection) -> bool:
    """Whether the database has every migration already; the check's read is ended, so that
    a migration that follows runs in a transaction of its own."""
    head = head_revision()
    try:
        return head is not None and current_revision(conn) == head
    finally:
        conn.rollback()
