"""Several real `corral serve` processes on one Postgres database (issue 14, docs/cluster.md).

Each test starts its nodes on a fresh database, sends its workload through chosen or random
nodes, and lets the checker read the whole history back: every accepted input carried once,
runs of a session never overlapping and in order, seq gap-free, every observer complete.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tests.cluster.harness import ClusterHarness, Node, fresh_database, poll
from tests.helpers import sse_frames, until_event

PARK = '/tool wait {"ms": 1}'  # on the "careful" agent: the run waits for a decision
LEASE_S = 3.0


async def owner_of(cluster: ClusterHarness, session_id: str) -> str | None:
    row = await cluster.db.fetchrow("SELECT node_id FROM sessions WHERE id = $1", session_id)
    return None if row is None else row["node_id"]


async def cluster_view(node: Node) -> dict[str, Any]:
    response = await node.http.get("/v1/cluster")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def accepted_within(cluster: ClusterHarness, session_id: str, content: str, deadline_s: float) -> float:
    """Offer the message through live nodes until one accepts it; returns the seconds it took."""
    began = time.monotonic()
    while True:
        answer = await cluster.offer(session_id, content)
        if hasattr(answer, "input_id"):
            return time.monotonic() - began
        assert answer.status in (None, 503), answer  # refused only while the owner's lease runs out
        assert time.monotonic() - began < deadline_s, f"not accepted within {deadline_s} s: {answer}"
        await asyncio.sleep(0.2)  # noqa: ASYNC110 - a client's retry, paced as Retry-After asks


async def test_three_nodes_serve_every_session_from_any_node(tmp_path: Path) -> None:
    async with asyncio.timeout(90), fresh_database() as url, ClusterHarness(url, tmp_path, 3, seed=3) as cluster:
        await cluster.create_agent("careful", policy={"approvals": {"wait": "ask"}})
        plain = [await cluster.create_session(node=i % 3) for i in range(6)]
        gated = await cluster.create_session("careful", node=0)
        # Observers on every node, none of them necessarily the owner.
        for index, session in enumerate([*plain, gated]):
            await cluster.observe(session, node=(index + 1) % 3)
            await cluster.observe(session, node=(index + 2) % 3)

        # Each node names itself; the cluster view lists all three, live.
        ids = {node.node_id for node in cluster.nodes}
        assert len(ids) == 3 and None not in ids
        view = await cluster_view(cluster.nodes[1])
        assert view["mode"] == "cluster" and {n["id"] for n in view["nodes"]} == ids
        assert all(n["state"] == "live" and n["heartbeat_age_s"] < LEASE_S for n in view["nodes"])

        # Every mode, sent through random nodes.
        for round_ in range(3):
            for session in plain:
                await cluster.send(session, f"/steps 2 20 r{round_}")
                await cluster.send(session, f"steer {round_}", "steer")
                await cluster.send(session, f"c{round_}", "collect")
                await cluster.send(session, f"q{round_}")
        stepping = await cluster.send(plain[0], "/steps 30 50")
        await cluster.send(plain[0], "interrupted you", "interrupt")
        long_one = await cluster.send(plain[1], "/steps 30 50")
        await cluster.send(plain[1], "rolled back", "rollback")
        cancelled = await cluster.send(plain[2], "/steps 30 50")
        await cluster.cancel(cancelled.run_id, "soft", node=1)

        # An approval decided through a node that is not the session's owner.
        parked = await cluster.send(gated, PARK)
        call_id = await cluster.approval_requested(parked.run_id, node=2)
        await cluster.decide(parked.run_id, call_id, "approve", node=1)
        assert (await cluster.wait_run(parked.run_id, node=2))["status"] == "completed"

        await cluster.settle()
        assert await cluster.check() == []
        # The sessions stayed where they were created; writes through other nodes were forwarded.
        for index, session in enumerate(plain):
            assert await owner_of(cluster, session) == cluster.nodes[index % 3].node_id
        served = {a.served_by for a in cluster.accepted}
        assert served <= ids and len(served) == 3
        assert {r["status"] for r in await cluster.db.fetch(
            "SELECT status FROM runs WHERE id = ANY($1)", [stepping.run_id, long_one.run_id, cancelled.run_id])} \
            == {"cancelled"}


async def test_a_node_killed_twice_mid_workload_loses_nothing(tmp_path: Path) -> None:
    async with asyncio.timeout(100), fresh_database() as url, \
            ClusterHarness(url, tmp_path, 3, seed=7, lease_ttl_s=LEASE_S) as cluster:
        sessions = [await cluster.create_session(node=i % 3) for i in range(6)]
        for session in sessions:
            await cluster.observe(session, node=2)  # node 2 is never killed: its observers see it all
        takeovers: list[float] = []
        for victim in (0, 1):
            mine = [s for s in sessions if await owner_of(cluster, s) == cluster.nodes[victim].node_id]
            assert mine
            for session in sessions:
                await cluster.send(session, "/steps 3 100")
                await cluster.send(session, "behind it")
            await cluster.nodes[victim].kill()
            # Its sessions continue on the others within the lease plus 2 s.
            for session in mine:
                takeovers.append(await accepted_within(cluster, session, "after the kill", LEASE_S + 2.0 + 1.0))
            await cluster.nodes[victim].restart()  # back as a new node: it serves again, owning nothing yet
        await cluster.settle()
        assert await cluster.check() == []
        assert max(takeovers) <= LEASE_S + 2.0 + 1.0  # + 1 s: the client's own retry pacing
        states = [n["state"] for n in (await cluster_view(cluster.nodes[2]))["nodes"]]
        assert sorted(states) == ["dead", "dead", "live", "live", "live"]  # the killed incarnations are fenced


async def test_a_paused_node_is_fenced_and_commits_nothing_after_the_takeover(tmp_path: Path) -> None:
    async with asyncio.timeout(90), fresh_database() as url, \
            ClusterHarness(url, tmp_path, 2, seed=11, lease_ttl_s=LEASE_S) as cluster:
        zombie, survivor = cluster.nodes
        session = await cluster.create_session(node=zombie)
        observer = await cluster.observe(session, node=survivor)
        cut = await cluster.send(session, "/steps 6 200", node=zombie)
        await observer.wait_event("tool.started", run_id=cut.run_id)

        zombie.pause()  # a long GC, a VM stall: its lease runs out while it cannot tell
        await accepted_within(cluster, session, "while it sleeps", LEASE_S + 3.0)
        assert await owner_of(cluster, session) == survivor.node_id
        await cluster.settle()
        events_before = await cluster.db.fetchval("SELECT count(*) FROM events")

        zombie.resume()  # it wakes mid-run, with writes in hand: every one must be refused
        assert zombie.proc is not None
        code = await asyncio.wait_for(zombie.proc.wait(), timeout=LEASE_S * 3)  # it learns, and stops
        assert code in (0, -15), zombie.log_tail()
        assert await cluster.db.fetchval("SELECT count(*) FROM events") == events_before
        runs = {r["id"]: r["status"] for r in await cluster.db.fetch("SELECT id, status FROM runs")}
        assert runs[cut.run_id] == "interrupted"  # recovered by the survivor, never ended by the zombie
        assert await cluster.check() == []


async def test_restarting_a_node_never_interrupts_another_nodes_runs(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 2) as cluster:
        busy, other = cluster.nodes
        session = await cluster.create_session(node=busy)
        running = await cluster.send(session, "/steps 10 100", node=busy)
        observer = await cluster.observe(session, node=busy)
        await observer.wait_event("tool.started", run_id=running.run_id)
        await other.stop()
        await other.restart()  # its start-up recovery touches only its own sessions
        finished = await cluster.wait_run(running.run_id, node=other)
        assert finished["status"] == "completed"
        assert await cluster.check() == []


async def test_a_job_fires_once_with_three_nodes_up(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 3) as cluster:
        session = await cluster.create_session(node=1)
        response = await cluster.nodes[0].http.post("/v1/jobs", json={
            "agent": "assistant", "session_id": session, "schedule": {"every_s": 1}, "message": "tick"})
        assert response.status_code == 201, response.text
        job = response.json()["id"]

        async def fires() -> int:
            return int(await cluster.db.fetchval(
                "SELECT count(*) FROM job_fires WHERE job_id = $1 AND status = 'fired'", job))

        async def fired(count: int) -> bool:
            return await fires() >= count

        await poll(lambda: fired(2))
        # The node that created the job dies: the others know the job too, and it goes on firing.
        await cluster.nodes[0].kill()
        after_kill = await fires()
        await poll(lambda: fired(after_kill + 2))
        assert (await cluster.nodes[2].http.delete(f"/v1/jobs/{job}")).status_code == 204
        fires = await cluster.db.fetch("SELECT fire_at, run_id FROM job_fires WHERE job_id = $1", job)
        inputs = await cluster.db.fetch("SELECT idempotency_key FROM inputs WHERE session_id = $1", session)
        keys = [row["idempotency_key"] for row in inputs]
        # Three schedulers saw each due time: one fire row, one input, per due time.
        assert len(keys) == len(set(keys)) == len({row["fire_at"] for row in fires}) == len(fires)
        await cluster.settle()
        assert await cluster.check() == []


async def test_a_feed_on_one_node_hears_of_runs_on_another(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 2) as cluster:
        owner, listener = cluster.nodes
        session = await cluster.create_session(node=owner)
        async with listener.http.stream("GET", "/v1/feed") as response:
            frames = sse_frames(response)
            accepted = await cluster.send(session, "hello", node=owner)
            done = await until_event(frames, "run.completed", run_id=accepted.run_id)
        assert done.json["session_id"] == session and done.json["output"] == "echo: hello"


async def test_a_subagent_reports_exactly_once_across_a_node_kill(tmp_path: Path) -> None:
    async with asyncio.timeout(90), fresh_database() as url, \
            ClusterHarness(url, tmp_path, 2, lease_ttl_s=LEASE_S) as cluster:
        doomed, survivor = cluster.nodes
        await cluster.create_agent("boss", tools=["spawn_subagent", "wait"])
        parent = await cluster.create_session("boss", node=doomed)
        observer = await cluster.observe(parent, node=survivor)
        spawn = '/tool spawn_subagent {"task": "/steps 4 500", "agent": "assistant"}'
        spawning = await cluster.send(parent, spawn, node=doomed)
        await observer.wait_event("subagent.spawned", run_id=spawning.run_id)
        child = await cluster.db.fetchval("SELECT child_session_id FROM subagents WHERE parent_session_id = $1",
                                          parent)

        async def child_running() -> bool:
            return bool(await cluster.db.fetchval(
                "SELECT count(*) FROM runs WHERE session_id = $1 AND status = 'running'", child))

        await poll(child_running)
        assert (await cluster.wait_run(spawning.run_id, node=survivor))["status"] == "completed"
        await doomed.kill()  # mid-run: the survivor takes the child over, re-runs it, and reports it

        async def reported() -> bool:
            return bool(await cluster.db.fetchval(
                "SELECT count(*) FROM inputs WHERE session_id = $1 AND idempotency_key = $2",
                parent, f"announce:{child}"))

        await poll(reported)
        await cluster.settle({parent, child})
        reports = await cluster.db.fetch("SELECT content FROM inputs WHERE session_id = $1 AND idempotency_key = $2",
                                         parent, f"announce:{child}")
        assert len(reports) == 1 and "completed" in reports[0]["content"]
        assert await owner_of(cluster, child) == survivor.node_id
        problems = await cluster.check(sessions={parent, child})
        assert problems == [], '\n'.join(problems)


async def test_the_openai_endpoint_works_through_any_node(tmp_path: Path) -> None:
    async with asyncio.timeout(60), fresh_database() as url, ClusterHarness(url, tmp_path, 2) as cluster:
        first, second = cluster.nodes
        body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-corral-session": "durable-chat"}
        created = await first.http.post("/v1/chat/completions", json=body, headers=headers)
        assert created.status_code == 200, created.text
        owner = created.headers["x-corral-node"]
        # The same durable conversation through the other node: forwarded to its owner, streamed too.
        again = await second.http.post("/v1/chat/completions", json={**body, "messages": [
            {"role": "user", "content": "again"}]}, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == "echo: again"
        assert again.headers["x-corral-node"] == owner == first.node_id
        chunks = []
        async with second.http.stream("POST", "/v1/chat/completions", headers=headers, json={
                **body, "stream": True, "messages": [{"role": "user", "content": "streamed"}]}) as response:
            assert response.status_code == 200
            chunks = [line async for line in response.aiter_lines() if line.startswith("data:")]
        assert chunks[-1] == "data: [DONE]" and any("streamed" in chunk for chunk in chunks)
