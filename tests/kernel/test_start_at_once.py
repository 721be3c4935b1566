"""A run accepted on an idle session begins in its accepting commit (``Intake._starts_at_once``):
one group commit less on a turn's way. Runs that must wait (a starting agent, a busy session,
collect mode) still begin in a commit of their own; a refused acceptance leaves nothing."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from corral.errors import StoreConflict
from corral.kernel import Kernel
from corral.specs import AgentSpec
from corral.store import repo
from corral.store import tables as t
from corral.types import Mode
from tests.helpers import get_run, new_session, run_events, select_all, wait_run


async def test_on_an_idle_session_the_run_is_running_once_its_input_is_accepted(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        accepted = await kernel.submit(session, "/steps 3 100")
        row = await kernel.store.read(repo.get_run, accepted.run_id)  # what the 202 vouches for
        assert row is not None and row.status == "running" and row.started_at is not None
        events = await run_events(kernel, accepted.run_id)
        assert [e.type for e in events[:2]] == ["run.queued", "run.started"]
        assert events[1].data["contents"] == ["/steps 3 100"]
        assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"


async def test_runs_that_must_wait_begin_in_a_commit_of_their_own(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        # Behind a busy session's run.
        session = await new_session(kernel)
        first = await kernel.submit(session, "/steps 2 100")
        second = await kernel.submit(session, "after it")
        assert (await get_run(kernel, second.run_id))["status"] == "queued"
        assert (await wait_run(kernel, second.run_id))["output"] == "echo: after it"
        assert (await wait_run(kernel, first.run_id))["status"] == "completed"

        # On an agent still starting: queued until it is ready, then run.
        await kernel.agents.create(AgentSpec(name="slow", provider_options={"startup_ms": 300}))
        waiting = await kernel.submit(await new_session(kernel, "slow"), "hello")
        assert (await get_run(kernel, waiting.run_id))["status"] == "queued"
        assert (await wait_run(kernel, waiting.run_id))["output"] == "echo: hello"


async def test_a_refused_acceptance_leaves_nothing_and_the_session_goes_on(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await new_session(kernel)
        trigger = ("CREATE TRIGGER refuse_input BEFORE INSERT ON inputs WHEN NEW.content = 'refused' "
                   "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        await kernel.store.raw_write(lambda conn: conn.execute(sa.text(trigger)))
        with pytest.raises(StoreConflict):  # the driver's error, in the kernel's terms
            await kernel.submit(session, "refused")
        # Neither the run nor its events were written, and the lane is free again.
        runs = await select_all(kernel.store, sa.select(t.runs).where(t.runs.c.session_id == session))
        assert runs == []
        events = await select_all(kernel.store, sa.select(t.events).where(t.events.c.session_id == session))
        assert events == []
        after = await kernel.submit(session, "next", mode=Mode.REJECT)  # 'reject' proves the session idle
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: next"
        assert kernel.run_handle(after.run_id) is None
