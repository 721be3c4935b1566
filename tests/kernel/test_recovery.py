"""Start-up recovery (invariants 3 and 12): a crash leaves no run `running` and loses no input.

A crash is simulated by writing the store exactly as the kernel would have left it
(rows shaped like what the store makes of ``Intake``'s and ``Driver``'s writes), then starting
a kernel on it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from corral.kernel import Kernel, KernelConfig
from corral.loop.messages import message_row
from corral.providers.base import ToolCall
from corral.store import Event, Store, repo
from corral.store import tables as t
from corral.types import Decision, EventType, ExecPolicy, InputStatus, Mode, RunStatus, new_id
from tests.helpers import KernelHarness, get_run, run_events, select_all, seq_of, session_events, wait_event, wait_run

LIMIT = 30.0
CONFIG = KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=1.0)


# --- seeding a crashed store ----------------------------------------------------------------


@dataclass
class SeedRun:
    id: str
    status: str
    input_ids: list[str]


@dataclass
class SessionSeed:
    """Rows of one session as a crashed kernel would have left them."""

    id: str = field(default_factory=lambda: new_id("ses"))
    agent: str = "assistant"
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {
        "runs": [], "inputs": [], "messages": [], "approvals": [], "events": []})
    _input_seq: int = 0

    def _event(self, type_: EventType, run_id: str, data: dict[str, Any]) -> None:
        events = self.rows["events"]
        events.append({"session_id": self.id, "seq": len(events) + 1, "run_id": run_id, "type": type_.value,
                       "data": data, "ts": datetime.now(UTC)})

    def run(self, status: RunStatus, position: float, *contents: str, policy: str = "continue",
            steers: tuple[str, ...] = ()) -> SeedRun:
        """A run carrying ``contents``; a started run consumed them (and has their user messages).

        ``steers`` are inputs accepted in mode ``steer`` but not yet taken by the run.
        """
        now = datetime.now(UTC)
        run_id = new_id("run")
        started = status in (RunStatus.RUNNING, RunStatus.WAITING)
        self.rows["runs"].append({
            "id": run_id, "session_id": self.id, "status": status.value, "position": position,
            "policy": policy, "collect": False, "created_at": now, "started_at": now if started else None,
        })
        input_ids = []
        for content in contents:
            input_ids.append(self._input(run_id, content, "queue", "queued",
                                         InputStatus.CONSUMED if started else InputStatus.PENDING))
        self._event(EventType.RUN_QUEUED, run_id, {"input_ids": list(input_ids), "mode": "queue"})
        if started:
            self._event(EventType.RUN_STARTED, run_id, {"input_ids": list(input_ids)})
            for input_id, content in zip(input_ids, contents, strict=True):
                self.rows["messages"].append(message_row(self.id, run_id, "user", content, input_id=input_id))
        for content in steers:
            input_ids.append(self._input(run_id, content, "steer", "steered", InputStatus.PENDING))
        return SeedRun(run_id, status.value, input_ids)

    def _input(self, run_id: str, content: str, mode: str, disposition: str, status: InputStatus) -> str:
        self._input_seq += 1
        input_id = new_id("in")
        self.rows["inputs"].append({
            "id": input_id, "session_id": self.id, "run_id": run_id, "seq": self._input_seq, "content": content,
            "mode": mode, "disposition": disposition, "status": status.value, "origin": "api",
            "idempotency_key": None, "created_at": datetime.now(UTC),
        })
        return input_id

    def tool_step(self, run: SeedRun, call_id: str, tool: str, arguments: dict[str, Any], *,
                  result: str | None = None, pending_approval: bool = False,
                  approval_status: str = "pending") -> None:
        """The run's model asked for a tool call (answered with ``result``, or waiting for approval)."""
        call = {"id": call_id, "name": tool, "arguments": arguments}
        self.rows["messages"].append(message_row(self.id, run.id, "assistant", "",
                                                 tool_calls=[ToolCall(call_id, tool, arguments)]))
        self._event(EventType.MESSAGE_COMPLETED, run.id, {"role": "assistant", "content": "", "tool_calls": [call]})
        if result is not None:
            self.rows["messages"].append(message_row(self.id, run.id, "tool", result, tool_call_id=call_id))
            self._event(EventType.TOOL_COMPLETED, run.id, {"call_id": call_id, "tool": tool, "result": result,
                                                           "is_error": False})
        if pending_approval:
            self.rows["approvals"].append({
                "run_id": run.id, "call_id": call_id, "session_id": self.id, "tool": tool, "arguments": arguments,
                "status": approval_status, "created_at": datetime.now(UTC),
            })
            self._event(EventType.APPROVAL_REQUESTED, run.id, {"call_id": call_id, "tool": tool,
                                                               "arguments": arguments})
            self._event(EventType.RUN_WAITING, run.id, {"pending": [call_id]})


async def seed(url: str, *sessions: SessionSeed) -> None:
    """Write the sessions' rows into a migrated database, bypassing the kernel."""
    store = Store(url)
    try:
        await store.migrate()
        def write(conn: sa.Connection) -> None:
            for s in sessions:
                repo.insert_session(conn, {"id": s.id, "agent": s.agent, "owner": "local", "key": None,
                                           "metadata": {}, "created_at": datetime.now(UTC)})
            for table in (t.runs, t.inputs, t.messages, t.approvals, t.events):
                rows = [row for s in sessions for row in s.rows[table.name]]
                if rows:
                    conn.execute(table.insert(), rows)

        await store.raw_write(write)
    finally:
        await store.aclose()


# --- reading what happened ----------------------------------------------------------------


async def input_rows(kernel: Kernel, input_ids: list[str]) -> dict[str, Any]:
    rows = await select_all(kernel.store, sa.select(t.inputs).where(t.inputs.c.id.in_(input_ids)))
    return {row.id: row for row in rows}


async def messages_of(kernel: Kernel, run_id: str) -> list[Any]:
    query = sa.select(t.messages).where(t.messages.c.run_id == run_id).order_by(t.messages.c.id)
    return await select_all(kernel.store, query)


async def runs_of(kernel: Kernel, session_id: str) -> list[Any]:
    return list(await kernel.store.read(repo.list_runs, session_ids=[session_id], statuses=None, limit=100, offset=0))


def assert_gap_free(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


# --- the crash scenario -------------------------------------------------------------------


@dataclass
class Crash:
    busy: SessionSeed
    running: SeedRun
    queued: list[SeedRun]
    parked: SessionSeed
    waiting: SeedRun
    behind_waiting: SeedRun


def crashed_state() -> Crash:
    busy = SessionSeed()
    running = busy.run(RunStatus.RUNNING, 1.0, "/steps 2 0")
    busy.tool_step(running, "call_1_0", "wait", {"ms": 0}, result="waited 0 ms")  # one step done, then crash
    # Inserted out of order on purpose: recovery orders by position, not by row order.
    third = busy.run(RunStatus.QUEUED, 3.0, "third")
    second = busy.run(RunStatus.QUEUED, 2.0, "second")
    parked = SessionSeed()
    waiting = parked.run(RunStatus.WAITING, 1.0, '/tool echo {"text": "approved!"}', policy="pause")
    parked.tool_step(waiting, "call_1_0", "echo", {"text": "approved!"}, pending_approval=True)
    behind = parked.run(RunStatus.QUEUED, 2.0, "after the approval")
    return Crash(busy, running, [second, third], parked, waiting, behind)


async def check_recovery(harness: KernelHarness) -> None:
    crash = crashed_state()
    await seed(harness.url, crash.busy, crash.parked)
    seeded_busy = len(crash.busy.rows["events"])
    seeded_parked = len(crash.parked.rows["events"])
    kernel = await harness.start()
    sid = crash.busy.id

    # The cut-off run is interrupted, with its event, and its messages leave the context.
    row = await get_run(kernel, crash.running.id)
    assert row["status"] == "interrupted"
    assert row["error"]["code"] == "interrupted"
    assert row["ended_at"] is not None and row["ended_at"] >= row["started_at"]
    old_messages = await messages_of(kernel, crash.running.id)
    assert [m.role for m in old_messages] == ["user", "assistant", "tool"]
    assert all(m.rolled_back for m in old_messages)

    # Its input moved to a new run, at the front of the queue.
    (moved,) = (await input_rows(kernel, crash.running.input_ids)).values()
    requeued = moved.run_id
    assert requeued != crash.running.id
    assert moved.status in ("pending", "consumed")  # it may already have started
    new_row = await get_run(kernel, requeued)
    assert new_row["position"] < min(r["position"] for r in crash.busy.rows["runs"])

    # Everything of that session completes, in position order.
    ordered = [requeued] + [r.id for r in crash.queued]
    finished = [await wait_run(kernel, run_id) for run_id in ordered]
    assert [r["status"] for r in finished] == ["completed"] * 3
    assert [r["output"] for r in finished] == ['done 2 steps; steering seen: []', "echo: second", "echo: third"]
    events = await session_events(kernel, sid)
    assert_gap_free(events)
    tail = events[seeded_busy:]
    assert [(e.type, e.run_id) for e in tail[:3]] == [
        ("run.interrupted", crash.running.id), ("input.requeued", requeued), ("run.queued", requeued)]
    assert tail[1].data == {"input_ids": crash.running.input_ids, "from_run_id": crash.running.id,
                            "run_id": requeued}
    assert [e.type for e in events if e.run_id == crash.running.id][-1] == "run.interrupted"
    starts = [seq_of(events, "run.started", run_id) for run_id in ordered]
    ends = [seq_of(events, "run.completed", run_id) for run_id in ordered]
    assert starts[0] < ends[0] < starts[1] < ends[1] < starts[2] < ends[2]
    # The re-run did the whole turn again from its own (not rolled back) messages.
    assert [m.rolled_back for m in await messages_of(kernel, requeued)] == [False] * 6

    # The waiting run stays parked, holding its session, and no one started behind it.
    pid = crash.parked.id
    assert (await get_run(kernel, crash.waiting.id))["status"] == "waiting"
    assert (await get_run(kernel, crash.behind_waiting.id))["status"] == "queued"
    handle = kernel.run_handle(crash.waiting.id)
    assert handle is not None and handle.status is RunStatus.WAITING and handle.task is None
    assert handle.pending_approvals == {"call_1_0"}
    assert len(await session_events(kernel, pid)) == seeded_parked  # nothing recorded for it
    # It is approvable after the restart, completes, and then the queue moves on.
    await kernel.decide(crash.waiting.id, "call_1_0", Decision.APPROVE)
    done = await wait_run(kernel, crash.waiting.id)
    assert done["status"] == "completed" and done["output"] == "tool results: approved!"
    after = await wait_run(kernel, crash.behind_waiting.id)
    assert after["status"] == "completed" and after["output"] == "echo: after the approval"
    parked_events = await session_events(kernel, pid)
    assert_gap_free(parked_events)
    assert [e.type for e in parked_events[seeded_parked:] if e.run_id == crash.waiting.id] == [
        "approval.resolved", "tool.started", "tool.completed", "message.delta", "message.completed",
        "run.completed"]

    # A second restart finds nothing left to recover.
    await harness.stop()
    kernel = await harness.start()
    assert len(await session_events(kernel, sid)) == len(events)
    assert len(await session_events(kernel, pid)) == len(parked_events)
    assert sorted(r.status for r in await runs_of(kernel, sid)) == ["completed"] * 3 + ["interrupted"]


async def test_recovery_interrupts_requeues_dispatches_and_keeps_waiting(harness: KernelHarness) -> None:
    async with asyncio.timeout(LIMIT):
        await check_recovery(harness)


async def test_recovery_on_postgres(postgres_url: str) -> None:
    harness = KernelHarness(postgres_url, CONFIG)
    try:
        async with asyncio.timeout(LIMIT):
            await check_recovery(harness)
    finally:
        await harness.stop()


async def test_without_requeue_the_interrupted_input_is_reported_not_rerun(tmp_path: Any) -> None:
    from tests.helpers import sqlite_url

    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(requeue_interrupted=False, shutdown_grace_s=1.0))
    try:
        async with asyncio.timeout(LIMIT):
            crash = crashed_state()
            await seed(harness.url, crash.busy)
            kernel = await harness.start()
            sid = crash.busy.id
            row = await get_run(kernel, crash.running.id)
            assert row["status"] == "interrupted"
            (kept,) = (await input_rows(kernel, crash.running.input_ids)).values()
            assert kept.run_id == crash.running.id and kept.status == "consumed"
            assert all(m.rolled_back for m in await messages_of(kernel, crash.running.id))
            # The queued runs still run, in order.
            finished = [await wait_run(kernel, r.id) for r in crash.queued]
            assert [r["output"] for r in finished] == ["echo: second", "echo: third"]
            events = await session_events(kernel, sid)
            assert_gap_free(events)
            assert "input.requeued" not in {e.type for e in events}
            assert [e.type for e in events[len(crash.busy.rows["events"]):]][0] == "run.interrupted"
            assert sorted(r.status for r in await runs_of(kernel, sid)) == ["completed", "completed", "interrupted"]
    finally:
        await harness.stop()


async def test_a_steer_not_yet_taken_is_requeued_with_its_run(harness: KernelHarness) -> None:
    """Invariant 6 across a crash: the untaken steer rides along into the re-run."""
    async with asyncio.timeout(LIMIT):
        busy = SessionSeed()
        running = busy.run(RunStatus.RUNNING, 1.0, "hello", steers=("and also this",))
        await seed(harness.url, busy)
        kernel = await harness.start()
        rows = await input_rows(kernel, running.input_ids)
        (requeued,) = {row.run_id for row in rows.values()}
        assert requeued != running.id
        done = await wait_run(kernel, requeued)
        assert done["status"] == "completed"
        assert done["output"] == "echo: hello\nand also this"
        assert all(row.status == "consumed" for row in (await input_rows(kernel, running.input_ids)).values())
        assert_gap_free(await session_events(kernel, busy.id))


async def test_without_requeue_an_untaken_steer_still_becomes_the_next_run(tmp_path: Any) -> None:
    """Invariant 6 holds whatever the requeue policy: the steer was never part of the cut-off turn."""
    from tests.helpers import sqlite_url

    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(requeue_interrupted=False, shutdown_grace_s=1.0))
    try:
        async with asyncio.timeout(LIMIT):
            busy = SessionSeed()
            running = busy.run(RunStatus.RUNNING, 1.0, "hello", steers=("and also this",))
            await seed(harness.url, busy)
            kernel = await harness.start()
            rows = await input_rows(kernel, running.input_ids)
            consumed, steer = (rows[i] for i in running.input_ids)
            assert (consumed.run_id, consumed.status) == (running.id, "consumed")
            assert steer.run_id != running.id
            done = await wait_run(kernel, steer.run_id)
            assert done["status"] == "completed" and done["output"] == "echo: and also this"
            events = await session_events(kernel, busy.id)
            assert_gap_free(events)
            (requeued,) = [e for e in events if e.type == "input.requeued"]
            assert requeued.data == {"input_ids": [steer.id], "from_run_id": running.id, "run_id": steer.run_id}
    finally:
        await harness.stop()


@pytest.mark.parametrize(("decision", "output"), [
    ("approved", "tool results: decided"),
    ("denied", "tool results: error: the call to echo was denied by a human"),
])
async def test_a_waiting_run_decided_just_before_the_crash_resumes_at_start(
    harness: KernelHarness, decision: str, output: str
) -> None:
    async with asyncio.timeout(LIMIT):
        parked = SessionSeed()
        waiting = parked.run(RunStatus.WAITING, 1.0, '/tool echo {"text": "decided"}', policy="pause")
        parked.tool_step(waiting, "call_1_0", "echo", {"text": "decided"}, pending_approval=True,
                         approval_status=decision)
        await seed(harness.url, parked)
        kernel = await harness.start()
        done = await wait_run(kernel, waiting.id)
        assert done["status"] == "completed" and done["output"] == output
        events = await session_events(kernel, parked.id)
        assert_gap_free(events)
        assert "run.interrupted" not in {e.type for e in events}


# --- graceful stop --------------------------------------------------------------------------


async def stop_mid_run(harness: KernelHarness, content: str) -> tuple[list[Event], str]:
    """Stop the kernel while ``content``'s run is in its first tool call; return its events and input."""
    kernel = await harness.start()
    sid = (await kernel.sessions.create("assistant", None, {}))[0]["id"]
    accepted = await kernel.submit(sid, content)
    await wait_event(kernel, sid, "tool.started", run_id=accepted.run_id)
    await harness.stop()
    kernel = await harness.start()
    row = await get_run(kernel, accepted.run_id)
    assert row["status"] == "interrupted"
    assert "shutting down" in row["error"]["message"]
    events = await run_events(kernel, accepted.run_id)
    assert events[-1].type == "run.interrupted"
    (moved,) = (await input_rows(kernel, [accepted.input_id])).values()
    assert moved.run_id != accepted.run_id
    done = await wait_run(kernel, moved.run_id)
    assert done["status"] == "completed"
    requeued = [e for e in await session_events(kernel, sid) if e.type == "input.requeued"]
    assert [(e.run_id, e.data["from_run_id"]) for e in requeued] == [(moved.run_id, accepted.run_id)]
    assert all(m.rolled_back for m in await messages_of(kernel, accepted.run_id))
    assert_gap_free(await session_events(kernel, sid))
    return events, str(done["output"])


async def test_graceful_stop_interrupts_at_the_next_boundary_and_requeues(harness: KernelHarness) -> None:
    """The step ends within the shutdown grace: the run stops softly after its tool call."""
    async with asyncio.timeout(LIMIT):
        events, output = await stop_mid_run(harness, "/steps 3 300")
        types = [e.type for e in events]
        assert types.count("tool.started") == types.count("tool.completed") == 1
        assert output == "done 3 steps; steering seen: []"


async def test_graceful_stop_hard_cancels_after_the_grace_and_requeues(tmp_path: Any) -> None:
    """The tool call outlasts the shutdown grace: the run is cut off mid-call, still `interrupted`."""
    from tests.helpers import sqlite_url

    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(shutdown_grace_s=0.05))
    try:
        async with asyncio.timeout(LIMIT):
            events, output = await stop_mid_run(harness, "/steps 2 400")
            types = [e.type for e in events]
            assert types.count("tool.started") == 1 and "tool.completed" not in types
            assert output == "done 2 steps; steering seen: []"
    finally:
        await harness.stop()


async def test_graceful_stop_requeues_steers_the_run_already_took(harness: KernelHarness) -> None:
    """A delivered steer is part of the interrupted turn: rolled back with it, so re-run with it."""
    async with asyncio.timeout(LIMIT):
        kernel = await harness.start()
        sid = (await kernel.sessions.create("assistant", None, {}))[0]["id"]
        accepted = await kernel.submit(sid, "/steps 3 300")
        await wait_event(kernel, sid, "tool.started", run_id=accepted.run_id)
        steer = await kernel.submit(sid, "turn left", mode=Mode.STEER)
        assert steer.run_id == accepted.run_id
        await wait_event(kernel, sid, "run.steered", run_id=accepted.run_id)
        await harness.stop()
        kernel = await harness.start()
        assert (await get_run(kernel, accepted.run_id))["status"] == "interrupted"
        rows = await input_rows(kernel, [accepted.input_id, steer.input_id])
        (rerun,) = {row.run_id for row in rows.values()}
        assert rerun != accepted.run_id
        done = await wait_run(kernel, rerun)
        assert done["output"] == 'done 3 steps; steering seen: ["turn left"]'
        assert {row.status for row in (await input_rows(kernel, list(rows))).values()} == {"consumed"}


async def test_a_parked_run_resumes_after_restart_without_repeating_its_steer(harness: KernelHarness) -> None:
    async with asyncio.timeout(LIMIT):
        kernel = await harness.start()
        sid = (await kernel.sessions.create("assistant", None, {}))[0]["id"]
        accepted = await kernel.submit(sid, "/steps 2 0", policy=ExecPolicy.PAUSE)
        first_wait = await wait_event(kernel, sid, "run.waiting", run_id=accepted.run_id)
        steer = await kernel.submit(sid, "turn left", mode=Mode.STEER)
        await kernel.decide(accepted.run_id, first_wait.data["pending"][0], Decision.APPROVE)
        second_wait = await wait_event(kernel, sid, "run.waiting", run_id=accepted.run_id, after=first_wait.seq)
        (taken,) = (await input_rows(kernel, [steer.input_id])).values()
        assert (taken.run_id, taken.status) == (accepted.run_id, "consumed")
        await harness.stop()
        kernel = await harness.start()
        await kernel.decide(accepted.run_id, second_wait.data["pending"][0], Decision.APPROVE)
        done = await wait_run(kernel, accepted.run_id)
        assert done["output"] == 'done 2 steps; steering seen: ["turn left"]'
        users = [m.content for m in await messages_of(kernel, accepted.run_id) if m.role == "user"]
        assert users == ["/steps 2 0", "turn left"]


async def test_a_recovered_waiting_run_interrupted_later_is_requeued_with_its_input_and_policy(
    harness: KernelHarness,
) -> None:
    async with asyncio.timeout(LIMIT):
        kernel = await harness.start()
        sid = (await kernel.sessions.create("assistant", None, {}))[0]["id"]
        accepted = await kernel.submit(sid, "/steps 2 300", policy=ExecPolicy.PAUSE)
        first_wait = await wait_event(kernel, sid, "run.waiting", run_id=accepted.run_id)
        await harness.stop()
        kernel = await harness.start()  # the parked run is rebuilt from the store
        await kernel.decide(accepted.run_id, first_wait.data["pending"][0], Decision.APPROVE)
        await wait_event(kernel, sid, "tool.started", run_id=accepted.run_id, after=first_wait.seq)
        await harness.stop()  # cut off while it runs its approved call
        kernel = await harness.start()
        assert (await get_run(kernel, accepted.run_id))["status"] == "interrupted"
        (moved,) = (await input_rows(kernel, [accepted.input_id])).values()
        assert moved.run_id != accepted.run_id
        rerun = await get_run(kernel, moved.run_id)
        assert rerun["policy"] == "pause"  # step-through survives the interruption
        after = 0
        for _ in range(2):  # it parks before each of its two calls again
            waiting = await wait_event(kernel, sid, "run.waiting", run_id=moved.run_id, after=after)
            after = waiting.seq
            await kernel.decide(moved.run_id, waiting.data["pending"][0], Decision.APPROVE)
        done = await wait_run(kernel, moved.run_id)
        assert done["output"] == "done 2 steps; steering seen: []"
        runs = await runs_of(kernel, sid)
        assert sorted(r.status for r in runs) == ["completed", "interrupted"]
