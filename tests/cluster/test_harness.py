"""The cluster harness and the history checker, proved on ONE real ``corral serve`` over Postgres:
a mixed workload passes the checker, a crash and a restart pass it too, and a broken history
written by hand is caught, rule by rule."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.store import Store
from corral.store import tables as t
from tests.cluster.checker import Accepted, Observation, Seen, check_history, load_history
from tests.cluster.harness import ClusterHarness, fresh_database

PARK = '/tool wait {"ms": 1}'  # on the "careful" agent: the run waits for a decision, as long as we like


async def test_a_mixed_workload_on_one_node_passes_the_checker(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 1, seed=14) as cluster:
        await cluster.create_agent("careful", policy={"approvals": {"wait": "ask"}})
        gated, plain, asking = (await cluster.create_session("careful"), await cluster.create_session(),
                                await cluster.create_session("careful"))
        observers = [await cluster.observe(session) for session in (gated, plain, asking)]

        # A parked run holds the session busy, so every mode meets a busy session: a steer goes
        # into its inbox, a queue and a collect open runs behind it, the next collect joins.
        parked = await cluster.send(gated, PARK)
        await cluster.approval_requested(parked.run_id)
        steer = await cluster.send(gated, "also mention the weather", "steer")
        queued = await cluster.send(gated, "q1")
        collecting = await cluster.send(gated, "c1", "collect")
        joined = await cluster.send(gated, "c2", "collect")
        assert [a.disposition for a in (parked, steer, queued, collecting, joined)] == [
            "started", "steered", "queued", "queued", "collected"]
        assert joined.run_id == collecting.run_id and steer.run_id == parked.run_id
        # An interrupt ends the parked run before it took the steer: the steer is re-queued.
        interrupting = await cluster.send(gated, "i1", "interrupt")
        await cluster.wait_run(collecting.run_id)
        # A rollback of another parked run.
        again = await cluster.send(gated, PARK)
        await cluster.approval_requested(again.run_id)
        await cluster.send(gated, "r1", "rollback")

        # The plain agent: a stepping run cancelled softly, a failing run, an interrupt of a running run.
        stepping = await cluster.send(plain, "/steps 20 100")
        await observers[1].wait_event("tool.started", run_id=stepping.run_id)
        await cluster.send(plain, "/fail")
        await cluster.cancel(stepping.run_id, "soft")
        running = await cluster.send(plain, "/steps 20 100")
        await observers[1].wait_event("tool.started", run_id=running.run_id)
        await cluster.send(plain, "interrupted you", "interrupt")

        # Approvals: one approved, one denied, one run cancelled hard while it waits.
        for decision in ("approve", "deny"):
            ask = await cluster.send(asking, '/tool wait {"ms": 20}')
            await cluster.decide(ask.run_id, await cluster.approval_requested(ask.run_id), decision)
            assert (await cluster.wait_run(ask.run_id))["status"] == "completed"
        waiting = await cluster.send(asking, PARK)
        await cluster.approval_requested(waiting.run_id)
        await cluster.cancel(waiting.run_id, "hard")

        # A late observer resumes in the middle of a session's log.
        await cluster.observe(gated, after=(await cluster.last_seq(gated)) // 2, label="late observer")
        await cluster.settle()
        assert await cluster.check() == []

        statuses = {r["status"] for r in await cluster.db.fetch("SELECT status FROM runs")}
        assert statuses == {"completed", "cancelled", "failed"}
        requeued = await cluster.db.fetch("SELECT data FROM events WHERE type = 'input.requeued'")
        assert [json.loads(r["data"])["input_ids"] for r in requeued] == [[steer.input_id]]
        assert interrupting.disposition == "queued"
        assert len(cluster.accepted) == 15 and cluster.refused == []


async def test_a_crash_and_a_restart_pass_the_checker(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 1) as cluster:
        node = cluster.nodes[0]
        session = await cluster.create_session()
        observer = await cluster.observe(session)
        cut = await cluster.send(session, "/steps 4 100")
        behind = await cluster.send(session, "behind it")
        await observer.wait_event("tool.started", run_id=cut.run_id)

        await node.kill()
        assert not node.running
        await node.restart()  # recovery: the cut-off run is interrupted, its input re-queued and run again
        await cluster.settle()
        assert await cluster.check() == []
        # It resumed with Last-Event-ID across the crash, on the same node.
        assert [node for node, _ in observer.connections] == [0, 0] and observer.connections[1][1] > 0
        statuses = {r["id"]: r["status"] for r in await cluster.db.fetch("SELECT id, status FROM runs")}
        assert statuses[cut.run_id] == "interrupted" and statuses[behind.run_id] == "completed"
        assert sorted(statuses.values()) == ["completed", "completed", "interrupted"]

        # Paused, it answers nothing; resumed, it does; SIGTERM stops it within the bound.
        node.pause()
        answer = asyncio.ensure_future(node.http.get("/healthz"))
        done, _ = await asyncio.wait({answer}, timeout=0.3)
        assert not done
        node.resume()
        assert (await answer).status_code == 200
        assert await node.stop() in (0, -15)
        assert "start 2" in node.log_tail()


# --- the checker on a history broken by hand --------------------------------------------------


def _broken_history(conn: Connection) -> None:
    """One session whose history breaks every rule: two runs overlap (in time and in the log),
    start out of input order, an input runs in both, one is left pending, the log has a gap."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    conn.execute(sa.insert(t.sessions), [{"id": "ses_x", "agent": "assistant", "owner": "local", "key": None,
                                          "metadata": {}, "created_at": t0}])
    run: dict[str, Any] = {"session_id": "ses_x", "policy": "continue", "collect": False, "created_at": t0}
    conn.execute(sa.insert(t.runs), [
        {**run, "id": "run_a", "status": "completed", "position": 1.0, "started_at": at(5), "ended_at": at(10)},
        {**run, "id": "run_b", "status": "completed", "position": 2.0, "started_at": at(1), "ended_at": at(8)},
    ])
    entry: dict[str, Any] = {"session_id": "ses_x", "mode": "queue", "origin": "api", "created_at": t0,
                             "idempotency_key": None}
    conn.execute(sa.insert(t.inputs), [
        {**entry, "id": "in_1", "run_id": "run_a", "seq": 1, "content": "one", "disposition": "started",
         "status": "consumed"},
        {**entry, "id": "in_2", "run_id": "run_b", "seq": 2, "content": "two", "disposition": "queued",
         "status": "pending"},
    ])
    message: dict[str, Any] = {"session_id": "ses_x", "role": "user", "tool_calls": None, "tool_call_id": None,
                               "rolled_back": False, "created_at": t0}
    conn.execute(sa.insert(t.messages), [
        {**message, "run_id": "run_a", "input_id": "in_1", "content": "one"},
        {**message, "run_id": "run_b", "input_id": "in_1", "content": "one"},
    ])
    log = [(1, "run_b", "run.started", {"input_ids": ["in_2"]}),
           (2, "run_a", "run.started", {"input_ids": ["in_1"]}),
           (3, "run_b", "run.completed", {"status": "completed"}),
           (5, "run_a", "run.completed", {"status": "completed"})]  # no 4: a gap
    conn.execute(sa.insert(t.events), [{"session_id": "ses_x", "seq": seq, "run_id": run_id, "type": type_,
                                        "data": data, "ts": t0} for seq, run_id, type_, data in log])


async def test_the_checker_reports_a_broken_history(tmp_path: Path) -> None:
    async with asyncio.timeout(20), fresh_database() as url:
        store = Store(url)
        try:
            await store.migrate()
            await store.raw_write(_broken_history)
        finally:
            await store.aclose()
        accepted = [Accepted("in_1", "run_a", "ses_x", "started"), Accepted("in_2", "run_b", "ses_x", "queued"),
                    Accepted("in_lost", "run_a", "ses_x", "queued")]
        observed = Observation("ses_x", 0, (Seen(1, "run.started", "run_b"), Seen(2, "run.started", "run_a"),
                                            Seen(2, "run.started", "run_a"), Seen(5, "run.completed", "run_a")))
        violations = await check_history(url, accepted, [observed])
        by_rule: dict[str, list[str]] = {}
        for violation in violations:
            by_rule.setdefault(violation.split(":", 1)[0], []).append(violation)
        assert sorted(by_rule) == ["carried", "observer", "order", "overlap", "seq", "twice"], violations
        assert any("in_lost" in v and "not in the database" in v for v in by_rule["carried"])
        assert any("in_2 is left pending" in v for v in by_rule["carried"])
        assert any("run run_a started (seq 2) while run run_b was active" in v for v in by_rule["overlap"])
        assert any("overlap in time" in v for v in by_rule["overlap"])
        assert by_rule["seq"] == ["seq: session ses_x: event seqs are not 1..5: missing [4]"]
        assert any("in_1 was executed by runs ['run_a', 'run_b']" in v for v in by_rule["twice"])
        assert by_rule["order"] == ["order: session ses_x: run run_a (first input seq 1) started after run run_b "
                                    "(first input seq 2)"]
        assert any("got seq 2 again" in v for v in by_rule["observer"])
        assert any("missed seqs 3..4" in v for v in by_rule["observer"])
        history = await load_history(url)
        assert history.last_seq("ses_x") == 5 and len(history.runs) == 2
