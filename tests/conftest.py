from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from corral.kernel import Kernel, KernelConfig
from corral.settings import Settings
from tests.helpers import KernelHarness, sqlite_url

PG_ADMIN = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


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
        pytest.fail(f"the local Postgres server is required ({PG_ADMIN}): {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Store tests run on both backends (Prefect's habit)."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, interrupt_grace_s=0.5, shutdown_grace_s=1.0)
