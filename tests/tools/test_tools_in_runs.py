"""Built-in tools inside real runs: the workspace, and a hard cancel that leaves no process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from corral.kernel import Kernel, KernelConfig
from corral.settings import default_agent
from corral.specs import AgentSpec
from corral.tools import default_registry
from corral.types import CancelMode
from tests.helpers import KernelHarness, new_session, sqlite_url, until, until_gone, wait_event, wait_run

LIMIT = 30
WORKER = AgentSpec(name="worker", tools=["shell", "write_file", "read_file"])


@asynccontextmanager
async def kernel_with_tools(tmp_path: Path) -> AsyncIterator[Kernel]:
    config = KernelConfig(workspace_root=tmp_path / "ws", shutdown_grace_s=1.0)
    harness = KernelHarness(sqlite_url(tmp_path), config, agents=(default_agent(), WORKER), tools=default_registry())
    kernel = await harness.start()
    try:
        yield kernel
    finally:
        await harness.stop()


async def test_a_run_writes_then_reads_in_its_agents_workspace(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), kernel_with_tools(tmp_path) as kernel:
        session = await new_session(kernel, "worker")
        wrote = await kernel.submit(session, '/tool write_file {"path": "plan.md", "content": "step one"}')
        assert (await wait_run(kernel, wrote.run_id))["output"] == "tool results: wrote 8 bytes to plan.md"
        read = await kernel.submit(session, '/tool read_file {"path": "plan.md"}')
        assert (await wait_run(kernel, read.run_id))["output"] == "tool results: step one"
        assert (tmp_path / "ws" / "worker" / "plan.md").read_text() == "step one"
        escape = await kernel.submit(session, '/tool read_file {"path": "../../corral.db"}')
        assert "outside the workspace" in (await wait_run(kernel, escape.run_id))["output"]


async def test_a_hard_cancel_inside_shell_ends_the_run_and_its_processes_at_once(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), kernel_with_tools(tmp_path) as kernel:
        session = await new_session(kernel, "worker")
        pids = tmp_path / "ws" / "worker" / "pids"
        command = f"sleep 60 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; wait"
        accepted = await kernel.submit(session, "/tool shell " + json.dumps({"command": command}))
        await wait_event(kernel, session, "tool.started", run_id=accepted.run_id)
        async with asyncio.timeout(10):
            await until(pids.exists)  # both processes are up
        began = time.monotonic()
        await kernel.cancel(accepted.run_id, CancelMode.HARD)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled"
        assert time.monotonic() - began < 0.1
        await until_gone(*(int(p) for p in pids.read_text().split()), within=0.1)


async def test_powerful_tools_are_opt_in(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), kernel_with_tools(tmp_path) as kernel:
        session = await new_session(kernel, "assistant")  # the default tools: wait and echo
        accepted = await kernel.submit(session, '/tool shell {"command": "touch made"}')
        run = await wait_run(kernel, accepted.run_id)
        assert "unknown tool 'shell'" in run["output"]
        assert not (tmp_path / "ws" / "assistant" / "made").exists()
