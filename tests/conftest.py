from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from corral.kernel import Kernel, KernelConfig
from corral.settings import Settings
from tests.helpers import KernelHarness, drop_database, sqlite_url

# The test Postgres server: its superuser and a database to connect to, from which each test creates
# its own. `make test` (scripts/test_postgres.py) points this at a throwaway server when none answers here.
PG_ADMIN = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``postgres`` every test that needs the test Postgres server, so that ``pytest -m "not postgres"``
    runs the rest on a machine without one: the tests that take ``postgres_url``, ``db_url``'s postgres
    half (marked in its params), and the tests that call ``fresh_database`` (tests/cluster/harness.py).
    A test that reaches Postgres some other way says so itself (tests/bench/test_cluster_smoke.py)."""
    for item in items:
        code = getattr(inspect.unwrap(getattr(item, "function", None)), "__code__", None)
        calls = code.co_names if code is not None else ()
        if "postgres_url" in getattr(item, "fixturenames", ()) or "fresh_database" in calls:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[KernelHarness]:
    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=1.0))
    yield harness
    await harness.stop()


@pytest.fixture
async def kernel(harness: KernelHarness) -> Kernel:
    return await harness.start()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh Postgres database for one test, dropped afterwards."""
    name = f"corral_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"this test needs the test Postgres server ({PG_ADMIN}; `make test` provides one, "
                    f'`pytest -m "not postgres"` leaves these tests out): {exc}')
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await drop_database(admin, name)
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Store tests run on both backends (Prefect's habit)."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, interrupt_grace_s=0.5, shutdown_grace_s=1.0)
