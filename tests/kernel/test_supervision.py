"""Every unit of work has its own scope: one run's failure is that run's, never another's."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from corral.kernel import Kernel, KernelConfig
from corral.kernel.ports import Outcome, RunContext, Runner
from corral.kernel.runs import RunEnd
from corral.kernel.supervision import Supervisor
from corral.settings import default_agent
from corral.store import Store
from corral.types import CancelMode, RunStatus
from corral.wiring import default_backends, make_runner
from tests.helpers import new_session, sqlite_url, wait_run

LIMIT = 30


class Broken:
    """A runner with a bug: it raises what no layer expects."""

    usage: dict[str, int] = {}

    async def run(self) -> Outcome:
        raise RuntimeError("a bug in the runner")


def runner_breaking_on(text: str) -> object:
    def runner(context: RunContext) -> Runner:
        if context.prompt and context.prompt[0] == text:
            return Broken()
        return make_runner(context)
    return runner


async def test_a_scope_hands_its_units_failure_to_it_and_the_group_lives_on() -> None:
    async with asyncio.timeout(LIMIT):
        supervisor = Supervisor()
        failed: list[Exception] = []
        survivor_done = asyncio.Event()

        async def boom() -> None:
            raise ValueError("boom")

        async def survivor() -> None:
            await asyncio.sleep(0)
            survivor_done.set()

        async with asyncio.TaskGroup() as group:
            supervisor.open(group)
            supervisor.spawn(boom(), "boom", on_error=failed.append)
            supervisor.spawn(survivor(), "survivor")
            await survivor_done.wait()
        assert [str(e) for e in failed] == ["boom"]
        assert supervisor.failures == 1


async def test_a_run_that_raises_fails_alone(tmp_path: Path) -> None:
    backends = replace(default_backends(), runner=runner_breaking_on("break"))
    kernel = Kernel(Store(sqlite_url(tmp_path)), KernelConfig(shutdown_grace_s=1.0),
                    initial_agents=(default_agent(),), backends=backends)
    async with asyncio.timeout(LIMIT), kernel.running():
        await kernel.agents.wait_ready("assistant")
        calm, doomed = await new_session(kernel), await new_session(kernel)
        long_run = await kernel.submit(calm, "/steps 3 50")  # in flight while the other run breaks
        broken = await kernel.submit(doomed, "break")
        failed = await wait_run(kernel, broken.run_id)
        assert failed["status"] == "failed"
        assert failed["error"] == {"code": "internal", "message": "RuntimeError: a bug in the runner"}
        assert (await wait_run(kernel, long_run.run_id))["status"] == "completed"
        again = await kernel.submit(doomed, "fine now")
        assert (await wait_run(kernel, again.run_id))["output"] == "echo: fine now"


async def test_a_listener_that_raises_touches_no_run(tmp_path: Path) -> None:
    kernel = Kernel(Store(sqlite_url(tmp_path)), KernelConfig(shutdown_grace_s=1.0),
                    initial_agents=(default_agent(),))
    seen: list[RunEnd] = []

    def bad_listener(ended: RunEnd) -> None:
        raise RuntimeError("a listener's bug")

    kernel.on_run_end(bad_listener)
    kernel.on_run_end(seen.append)  # after the bad one: still told
    async with asyncio.timeout(LIMIT), kernel.running():
        await kernel.agents.wait_ready("assistant")
        calm, other = await new_session(kernel), await new_session(kernel)
        long_run = await kernel.submit(calm, "/steps 3 50")
        # Cancelled from a task of the kernel's own (as an observer going away does): the
        # listener's error escaped that task into the kernel's one group and cancelled every run.
        await kernel.submit(other, "/sleep 1")
        queued = await kernel.submit(other, "never runs")
        kernel.cancel_soon(queued.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, queued.run_id))["status"] == RunStatus.CANCELLED.value
        assert (await wait_run(kernel, long_run.run_id))["status"] == "completed"
        assert {e.run_id for e in seen} >= {queued.run_id, long_run.run_id}
