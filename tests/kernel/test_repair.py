"""The repair rule (kernel/repair.py): a transition whose write fails is finished, not forgotten.

A store that fails on cue (the real SQLite store, with one named operation refusing its
next N writes) is failed at each of the three transitions a message goes through:
accepting it, beginning its run, ending its run. In each case the session answers
503 with Retry-After while the write fails (never 500), nothing accepted is lost, the
one-active-run rule holds in the database, and the session goes on once the store
takes the write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from corral.errors import StoreRejected, StoreUnavailable
from corral.kernel import Kernel, KernelConfig
from corral.settings import default_agent
from corral.specs import AgentSpec
from corral.store import tables as t
from corral.types import Decision, Mode
from tests.faults import FlakyStore
from tests.helpers import new_session, select_all, sqlite_url, wait_event, wait_run

LIMIT = 30


@asynccontextmanager
async def flaky_kernel(tmp_path: Path) -> AsyncIterator[tuple[Kernel, FlakyStore]]:
    store = FlakyStore(sqlite_url(tmp_path))
    # Retries at once and then every few ms: the test waits on events, the backoff just stays short.
    config = KernelConfig(write_retry_min_s=0.005, write_retry_max_s=0.02, shutdown_grace_s=1.0)
    kernel = Kernel(store, config, initial_agents=(default_agent(),))
    async with kernel.running():
        await kernel.agents.wait_ready("assistant")
        yield kernel, store


async def active_runs_in_store(kernel: Kernel, session: str) -> list[str]:
    rows = await select_all(kernel.store, sa.select(t.runs.c.id).where(
        t.runs.c.session_id == session, t.runs.c.status.in_(["running", "waiting"])))
    return [row.id for row in rows]


async def test_a_failed_acceptance_answers_503_and_leaves_nothing(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        session = await new_session(kernel)
        store.fail("accept", times=2)
        for _ in range(2):
            with pytest.raises(StoreUnavailable) as refused:
                await kernel.submit(session, "hello")
            assert refused.value.retry_after > 0
        assert await select_all(kernel.store, sa.select(t.inputs).where(t.inputs.c.session_id == session)) == []
        assert kernel.session_view(session)["active_run_id"] is None  # the lane was given back
        assert len(kernel.hub.heads) == 0  # nor is a head kept for a run that never came to be
        accepted = await kernel.submit(session, "hello", mode=Mode.REJECT)  # 'reject' proves it idle
        assert (await wait_run(kernel, accepted.run_id))["output"] == "echo: hello"


async def test_a_failed_begin_is_written_again_and_the_run_goes_on(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        session = await new_session(kernel)
        first = await kernel.submit(session, "/sleep 0.2")  # begins in its accepting write
        store.fail("begin_run")
        second = await kernel.submit(session, "second")  # queued: begins on its own write, which fails
        await store.refusing.wait()
        with pytest.raises(StoreUnavailable):  # the session is held while its start is repaired
            await kernel.submit(session, "third")
        assert (await wait_run(kernel, first.run_id))["status"] == "completed"
        assert await active_runs_in_store(kernel, session) == []  # in the store, still queued
        store.heal("begin_run")
        assert (await wait_run(kernel, second.run_id))["output"] == "echo: second"
        assert store.refused["begin_run"] >= 1
        third = await kernel.submit(session, "third")
        assert (await wait_run(kernel, third.run_id))["output"] == "echo: third"


async def test_a_failed_end_holds_the_session_until_it_is_written(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        session = await new_session(kernel)
        store.fail("end_run")
        first = await kernel.submit(session, "/sleep 0.1")
        queued = await kernel.submit(session, "queued behind it")
        await store.refusing.wait()
        # The end is not recorded yet: the run is still active in the store, and the next run
        # must not start (the one-active-run index would refuse it) nor new input pile up.
        assert await active_runs_in_store(kernel, session) == [first.run_id]
        with pytest.raises(StoreUnavailable) as refused:
            await kernel.submit(session, "while the store is down")
        assert refused.value.retry_after > 0
        store.heal("end_run")  # the store is back: the same end is written, nothing of it lost
        ended = await wait_run(kernel, first.run_id)
        assert ended["status"] == "completed" and ended["output"] == "echo: /sleep 0.1"
        assert (await wait_run(kernel, queued.run_id))["output"] == "echo: queued behind it"
        assert store.refused["end_run"] >= 1
        runs = await select_all(kernel.store, sa.select(t.runs).where(t.runs.c.session_id == session)
                                .order_by(t.runs.c.started_at))
        assert [r.id for r in runs] == [first.run_id, queued.run_id]
        assert runs[0].ended_at <= runs[1].started_at  # never two active at once
        after = await kernel.submit(session, "after", mode=Mode.REJECT)
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: after"


async def test_an_end_the_store_rejects_for_good_is_recorded_as_failed(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        session = await new_session(kernel)
        store.fail("end_run", times=kernel.config.write_attempts, error=StoreRejected)
        run = await kernel.submit(session, "hello")
        ended = await wait_run(kernel, run.run_id)
        assert ended["status"] == "failed" and ended["output"] is None
        assert ended["error"]["code"] == "store_rejected"
        # Its input was consumed, not lost: the user message is in the history, and the session goes on.
        messages = await select_all(kernel.store, sa.select(t.messages).where(t.messages.c.session_id == session))
        assert [(m.role, m.content) for m in messages] == [("user", "hello")]
        after = await kernel.submit(session, "again", mode=Mode.REJECT)
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: again"


async def test_a_failed_step_write_fails_the_run_with_a_clear_error(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        session = await new_session(kernel)
        store.fail("record", times=1)  # the step's tool call (and so its result) is never recorded
        run = await kernel.submit(session, '/tool echo {"text": "x"}')
        ended = await wait_run(kernel, run.run_id)
        assert ended["status"] == "failed"
        assert ended["error"]["code"] == "run_write_failed"
        assert "history would be incomplete" in ended["error"]["message"]
        after = await kernel.submit(session, "after", mode=Mode.REJECT)
        assert (await wait_run(kernel, after.run_id))["output"] == "echo: after"


async def test_a_decision_whose_write_fails_leaves_the_question_standing(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        await kernel.agents.create(AgentSpec(name="careful", policy={"approvals": {"wait": "ask"}}))
        await kernel.agents.wait_ready("careful")
        session = await new_session(kernel, "careful")
        run = await kernel.submit(session, '/tool wait {"ms": 1}')
        call_id = (await wait_event(kernel, session, "approval.requested", run_id=run.run_id)).data["call_id"]
        store.fail("record", times=1)
        with pytest.raises(StoreUnavailable):
            await kernel.decide(run.run_id, call_id, Decision.APPROVE)
        handle = kernel.run_handle(run.run_id)
        assert handle is not None and call_id in handle.pending_approvals  # not recorded, so not decided
        await kernel.decide(run.run_id, call_id, Decision.APPROVE)  # answered again: taken
        assert (await wait_run(kernel, run.run_id))["status"] == "completed"


async def test_a_delete_the_store_refuses_leaves_the_agent_as_it_was(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), flaky_kernel(tmp_path) as (kernel, store):
        await kernel.agents.create(AgentSpec(name="helper"))
        agent = await kernel.agents.wait_ready("helper")
        session = await new_session(kernel, "helper")
        store.fill_disk()
        with pytest.raises(StoreUnavailable):
            await kernel.agents.delete("helper")
        store.free_disk()
        # Nothing changed: listed, ready, still in the store, and it still answers.
        assert kernel.agents.get("helper") is agent and kernel.agents.ready_now("helper")
        assert [row.name for row in await kernel.store.all_agents()].count("helper") == 1
        accepted = await kernel.submit(session, "still here")
        assert (await wait_run(kernel, accepted.run_id))["output"] == "echo: still here"
        await kernel.agents.delete("helper")  # and the retry deletes it
        assert not kernel.agents.exists("helper")
        assert "helper" not in [row.name for row in await kernel.store.all_agents()]
