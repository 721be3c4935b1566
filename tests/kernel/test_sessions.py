"""The session table stays bounded: idle sessions are forgotten (least recently used first)
and loaded again from the store; busy ones are never forgotten."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from corral.kernel import KernelConfig
from corral.kernel.sessions import SessionTable
from corral.lru import Lru
from corral.types import Mode
from tests.helpers import KernelHarness, new_session, sqlite_url, wait_run

LIMIT = 60


class RowsInMemory:
    """Just the read a session table loads with, answered at once: this test is about the
    table's policy at scale, not the store (the test below runs it against the real one)."""

    def __init__(self) -> None:
        self.loads = 0

    async def session_state(self, session_id: str) -> tuple[Any, tuple[int, float], int]:
        self.loads += 1
        return SimpleNamespace(agent="assistant", owner="local"), (0, 0.0), 0


async def test_100000_sessions_keep_the_table_at_its_capacity() -> None:
    async with asyncio.timeout(LIMIT):
        store = RowsInMemory()
        table = SessionTable(store, max_pending=10, capacity=1000)  # type: ignore[arg-type]
        busy = await table.get("ses_busy")
        busy.lane.accept("in_1", Mode.QUEUE, "run_1")  # an active run: never forgotten
        for n in range(100_000):
            await table.get(f"ses_{n}")
        assert len(table) == 1000
        assert table.live("ses_busy") is busy
        assert table.live("ses_99999") is not None and table.live("ses_0") is None
        assert table.evictions == 100_001 - 1000  # every idle one beyond capacity
        loads = store.loads
        await table.get("ses_0")  # forgotten: loaded again
        assert store.loads == loads + 1


def test_idempotency_keys_are_bounded_per_session() -> None:
    keys: Lru[str, int] = Lru(3)
    for n in range(100_000):
        keys.put(f"key-{n}", n)
    assert len(keys) == 3 and keys.get("key-99999") == 99_999 and keys.get("key-0") is None


async def test_a_forgotten_session_comes_back_whole(tmp_path: Path) -> None:
    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(live_sessions=2, idempotency_keys_per_session=1))
    kernel = await harness.start()
    try:
        async with asyncio.timeout(LIMIT):
            first = await new_session(kernel)
            one = await kernel.submit(first, "one", idempotency_key="k1")
            await wait_run(kernel, one.run_id)
            two = await kernel.submit(first, "two", idempotency_key="k2")  # k1 leaves the memory
            await wait_run(kernel, two.run_id)
            for _ in range(3):
                await new_session(kernel)  # pushes the idle first session out of the table
            assert kernel.sessions.live(first) is None
            again = await kernel.submit(first, "one", idempotency_key="k1")  # from the store
            assert again.duplicate and again.run_id == one.run_id
            three = await kernel.submit(first, "three")
            assert (await wait_run(kernel, three.run_id))["output"] == "echo: three"
            runtime = kernel.sessions.live(first)
            assert runtime is not None and runtime.last_input_seq == 3  # counters reloaded from the store
            assert runtime.completed_runs == 3
    finally:
        await harness.stop()
