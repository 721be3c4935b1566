"""Subagents: concurrent children, reports that arrive exactly once, waiting, cascade, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from corral.kernel import Kernel, KernelConfig
from corral.kernel.runs import RunEnd
from corral.services.subagents import Link, SubagentLimits, Subagents, install_subagents
from corral.settings import default_agent
from corral.specs import AgentSpec
from corral.store import Store, repo
from corral.store import tables as t
from corral.types import CancelMode, RunStatus
from tests.helpers import (
    client,
    corral_serve,
    get_run,
    http_server,
    new_session,
    run_events,
    select_all,
    sqlite_url,
    sse_frames,
    wait_event,
    wait_run,
)

LIMIT = 30
BOSS = AgentSpec(name="boss", tools=["spawn_subagent", "wait_subagents", "wait"])


@asynccontextmanager
async def with_subagents(url: str, limits: SubagentLimits | None = None) -> AsyncIterator[tuple[Kernel, Subagents]]:
    kernel = Kernel(Store(url), KernelConfig(shutdown_grace_s=1.0), initial_agents=(default_agent(), BOSS))
    service = install_subagents(kernel, limits)
    async with kernel.running():
        for name in ("assistant", "boss"):
            await kernel.agents.wait_ready(name)
        yield kernel, service


def spawn_lines(*tasks: str, agent: str = "assistant") -> str:
    return "\n".join("/tool spawn_subagent " + json.dumps({"task": task, "agent": agent}) for task in tasks)


async def announces(kernel: Kernel, session: str) -> list[str]:
    """The reports accepted into the parent session (inputs: durable at once, before any run takes them)."""
    rows = await select_all(kernel.store, sa.select(t.inputs.c.content).where(
        t.inputs.c.session_id == session, t.inputs.c.origin == "subagent").order_by(t.inputs.c.seq))
    return [row.content for row in rows]


async def test_three_children_run_concurrently_and_each_reports_once(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), with_subagents(sqlite_url(tmp_path)) as (kernel, service):
        boss = await new_session(kernel, "boss")
        spawned = await kernel.submit(boss, spawn_lines("/sleep 1", "/sleep 1", "/sleep 1"))
        events = await run_events(kernel, spawned.run_id)
        children = [e.data["child_session_id"] for e in events if e.type == "subagent.spawned"]
        assert len(children) == 3
        assert (await get_run(kernel, spawned.run_id))["status"] == "completed"  # the parent kept going
        async with service._settled:
            await service._settled.wait_for(lambda: service.announced == 3)
        child_runs = []
        for child in children:
            child_runs.append(await kernel.store.read(repo.latest_run, child))
        starts = [r.started_at for r in child_runs]
        ends = [r.ended_at for r in child_runs]
        # Together they took about as long as one of them, not the sum of the three.
        assert (max(ends) - min(starts)).total_seconds() < 2.0
        reports = await announces(kernel, boss)
        assert sorted(reports) == sorted(f"[subagent {c} completed] echo: /sleep 1" for c in children)
        links = await kernel.store.read(repo.children_of_session, boss)
        assert {link.child_session_id for link in links} == set(children)
        assert all(link.status == "completed" and link.announced_at is not None for link in links)


async def test_wait_subagents_parks_the_parent_until_its_children_report(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), with_subagents(sqlite_url(tmp_path)) as (kernel, _service):
        boss = await new_session(kernel, "boss")
        accepted = await kernel.submit(boss, spawn_lines("/sleep 0.5", "quick") + "\n/next\n/tool wait_subagents {}")
        waiting = await wait_event(kernel, boss, "run.waiting", run_id=accepted.run_id)
        assert waiting.data["waiting_for"] == "subagents" and len(waiting.data["children"]) == 2
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "completed"
        assert "(completed): echo: /sleep 0.5" in run["output"] and "(completed): echo: quick" in run["output"]


async def test_cancelling_the_parent_cancels_its_children(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), with_subagents(sqlite_url(tmp_path)) as (kernel, service):
        boss = await new_session(kernel, "boss")
        accepted = await kernel.submit(boss, spawn_lines("/sleep 30") + "\n/next\n/tool wait_subagents {}")
        waiting = await wait_event(kernel, boss, "run.waiting", run_id=accepted.run_id)
        (child,) = waiting.data["children"]
        await kernel.cancel(accepted.run_id, CancelMode.SOFT)  # waiting is a boundary: it stops at once
        assert (await wait_run(kernel, accepted.run_id))["status"] == "cancelled"
        async with service._settled:
            await service._settled.wait_for(lambda: service.announced == 1)
        link = await kernel.store.read(repo.subagent_link, child)
        last = await kernel.store.read(repo.latest_run, child)
        assert link is not None and link.status == "cancelled" and last is not None and last.status == "cancelled"
        assert await announces(kernel, boss) == []  # no new parent run in the name of a cancelled one


async def test_limits_refuse_with_a_clear_error(tmp_path: Path) -> None:
    limits = SubagentLimits(max_depth=1, max_children_per_session=2, max_total=100)
    async with asyncio.timeout(LIMIT), with_subagents(sqlite_url(tmp_path), limits) as (kernel, service):
        boss = await new_session(kernel, "boss")
        # A child (depth 1) that itself tries to spawn: depth 2 is refused, and its report says so.
        nested = await kernel.submit(boss, spawn_lines(spawn_lines("grandchild"), agent="boss"))
        assert "spawned subagent" in (await wait_run(kernel, nested.run_id))["output"]
        async with service._settled:
            await service._settled.wait_for(lambda: service.announced == 1)
        (report,) = await announces(kernel, boss)
        assert "subagents may nest 1 deep; this one would be 2 deep" in report
        second = await wait_run(kernel, (await kernel.submit(boss, spawn_lines("b"))).run_id)
        assert "spawned subagent" in second["output"]
        third = await wait_run(kernel, (await kernel.submit(boss, spawn_lines("c"))).run_id)
        assert "already spawned 2 subagents (the limit)" in third["output"]
        other = await new_session(kernel, "boss")
        unknown = await wait_run(kernel, (await kernel.submit(other, spawn_lines("e", agent="nobody"))).run_id)
        assert "no agent named 'nobody'" in unknown["output"]


async def test_reports_survive_a_restart_exactly_once(tmp_path: Path) -> None:
    """The child ended while nothing announced it (the process died first): the restart does."""
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with with_subagents(url) as (kernel, service):
            boss = await new_session(kernel, "boss")
            spawned = await kernel.submit(boss, spawn_lines("/sleep 0.3"))
            events = await run_events(kernel, spawned.run_id)
            (child,) = [e.data["child_session_id"] for e in events if e.type == "subagent.spawned"]
            service._on_run_end = lambda ended: None  # type: ignore[method-assign]  # the announce never happens
            kernel.run_end_listeners.clear()
            latest = await kernel.store.read(repo.latest_run, child)
            assert latest is not None
            await wait_run(kernel, latest.id)
            assert await announces(kernel, boss) == []
        for _ in range(2):  # twice: the second start finds it announced and does nothing
            async with with_subagents(url) as (kernel, service):
                await service.caught_up.wait()
                assert await announces(kernel, boss) == [f"[subagent {child} completed] echo: /sleep 0.3"]


async def test_the_session_lists_its_children(tmp_path: Path) -> None:
    from corral.settings import Settings
    async with asyncio.timeout(LIMIT), http_server(Settings(data_dir=tmp_path, shutdown_grace_s=1.0,
                                                            agents=[BOSS])) as (base, kernel):
        await kernel.agents.wait_ready("boss")
        async with client(base) as http:
            boss = (await http.post("/v1/sessions", json={"agent": "boss"})).json()["id"]
            accepted = (await http.post(f"/v1/sessions/{boss}/messages",
                                        json={"content": spawn_lines("hello")})).json()
            await wait_run(kernel, accepted["run_id"])
            detail = (await http.get(f"/v1/sessions/{boss}")).json()
            (child,) = detail["children"]
            assert child["task"] == "hello" and datetime.fromisoformat(child["created_at"])
            assert (await http.get(f"/v1/sessions/{child['session_id']}")).json()["parent_session_id"] == boss


async def test_a_report_arrives_exactly_once_across_a_kill_9(tmp_path: Path) -> None:
    """The real process dies while the child works; after the restart the child finishes and
    reports once, and a second restart does not report again."""
    boss_agent = json.dumps([BOSS.model_dump(mode="json")])
    async with asyncio.timeout(90):
        async with corral_serve(tmp_path, CORRAL_AGENTS=boss_agent) as server, client(server.base) as http:
            boss = (await http.post("/v1/sessions", json={"agent": "boss"})).json()["id"]
            accepted = (await http.post(f"/v1/sessions/{boss}/messages",
                                        json={"content": spawn_lines("/sleep 1.5")})).json()
            async with http.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
                async for frame in sse_frames(response):
                    if frame.event == "subagent.spawned":
                        child = frame.json["child_session_id"]
            child_run = (await http.get(f"/v1/sessions/{child}")).json()["active_run_id"]
            assert child_run is not None  # the child is at work...
            server.proc.kill()  # ...when the server dies
            await server.proc.wait()
        for restart in range(2):
            async with corral_serve(tmp_path, CORRAL_AGENTS=boss_agent) as server, client(server.base) as http:
                if restart == 0:  # the child's run is re-queued and finishes; its report starts a parent run
                    async with http.stream("GET", f"/v1/sessions/{boss}/events") as response:
                        async for frame in sse_frames(response):
                            if frame.event == "run.completed" and "[subagent" in frame.json.get("output", ""):
                                break
                messages = (await http.get(f"/v1/sessions/{boss}/messages")).json()
                reports = [m["content"] for m in messages if m["content"].startswith("[subagent ")]
                assert reports == [f"[subagent {child} completed] echo: /sleep 1.5"]
                detail = (await http.get(f"/v1/sessions/{boss}")).json()
                assert [c["status"] for c in detail["children"]] == ["completed"]


async def test_a_parent_waiting_across_a_graceful_restart_keeps_waiting(tmp_path: Path) -> None:
    """A graceful stop leaves a parent waiting on its children as a crash would: waiting. The
    next start resumes the wait; nothing is interrupted, re-queued or spawned twice."""
    url = sqlite_url(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with with_subagents(url) as (kernel, _service):
            boss = await new_session(kernel, "boss")
            accepted = await kernel.submit(boss, spawn_lines("/sleep 1.5") + "\n/next\n/tool wait_subagents {}")
            await wait_event(kernel, boss, "run.waiting", run_id=accepted.run_id)
        async with with_subagents(url) as (kernel, _service):
            run = await wait_run(kernel, accepted.run_id)
            assert run["status"] == "completed" and "(completed): echo: /sleep 1.5" in run["output"]
            events = await run_events(kernel, accepted.run_id)
            assert [e.type for e in events].count("subagent.spawned") == 1
            assert "run.interrupted" not in [e.type for e in events]


# --- ends waiting to be handled: merged by key, never dropped -------------------------------------


def end_of(session: str, run: str, status: RunStatus = RunStatus.COMPLETED, continued: bool = False) -> RunEnd:
    return RunEnd(session, run, status, "ok", None, continued=continued)


async def test_pending_ends_merge_by_key_are_never_dropped_and_stay_within_the_open_links(kernel: Kernel) -> None:
    service = Subagents(kernel)  # its loop not running: the ends stay pending, to be looked at
    service._open = {f"ses_child{i}": Link("ses_parent", "run_parent", 1) for i in range(3)}
    for n in range(1_000):
        for i in range(3):
            service._on_run_end(end_of(f"ses_child{i}", f"run_child{i}_{n}"))
        service._on_run_end(end_of("ses_parent", "run_parent", RunStatus.CANCELLED))  # cascades to the three
        service._on_run_end(end_of("ses_parent", f"run_other{n}", RunStatus.CANCELLED))  # no children: nothing
        service._on_run_end(end_of("ses_stranger", f"run_stranger{n}"))  # not a child: nothing
        service._on_run_end(end_of("ses_child0", f"run_requeued{n}", RunStatus.INTERRUPTED, continued=True))
    # Four thousand ends about open links, and four entries: one per child, one for the parent run.
    assert service.statistics() == {"open": 3, "pending": 4, "announced": 0, "merged": 3_996}
    handled = [await service._next_pending() for _ in range(4)]
    assert [(e.session_id, e.run_id) for e in handled] == [  # in arrival order, each with its first end
        ("ses_child0", "run_child0_0"), ("ses_child1", "run_child1_0"), ("ses_child2", "run_child2_0"),
        ("ses_parent", "run_parent")]
    assert service.statistics()["pending"] == 0


async def test_children_ending_while_the_service_is_busy_are_each_announced_once(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), with_subagents(sqlite_url(tmp_path)) as (kernel, service):
        await service.caught_up.wait()
        boss = await new_session(kernel, "boss")
        # Hold the service inside its first announce, so the other children's ends pile up.
        taken: list[str] = []
        entered, gate = asyncio.Event(), asyncio.Event()
        announce = service._announce

        async def held_announce(ended: RunEnd) -> None:
            taken.append(ended.session_id)
            entered.set()
            await gate.wait()
            await announce(ended)

        service._announce = held_announce  # type: ignore[method-assign]
        ends: dict[str, RunEnd] = {}
        all_ended = asyncio.Event()

        def note(ended: RunEnd) -> None:  # called after the service's own listener
            if ended.session_id != boss:
                ends[ended.session_id] = ended
                if len(ends) == 4:
                    all_ended.set()

        kernel.on_run_end(note)
        await kernel.submit(boss, spawn_lines("one", "two", "three", "four"))
        await entered.wait()
        await all_ended.wait()
        assert service.statistics() == {"open": 4, "pending": 3, "announced": 0, "merged": 0}
        for child, ended in ends.items():  # a repeated notice of an end still pending merges into it
            if child not in taken:
                service._on_run_end(ended)
        assert service.statistics() == {"open": 4, "pending": 3, "announced": 0, "merged": 3}
        gate.set()
        async with service._settled:
            await service._settled.wait_for(lambda: service.announced == 4)
        reports = await announces(kernel, boss)
        assert sorted(reports) == sorted(f"[subagent {child} completed] {end.output}" for child, end in ends.items())
        assert service.statistics() == {"open": 0, "pending": 0, "announced": 4, "merged": 3}
