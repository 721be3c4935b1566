"""External agents over ACP, against a real ACP program written with the SDK (acp_agent.py).

The program records every pid it ran as in ``pids/`` of its workspace, so the tests can
count the processes that are still alive rather than trust Corral's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.kernel import Kernel, KernelConfig
from corral.services.reflector import ReflectorConfig, install_reflector
from corral.settings import Settings
from corral.specs import AgentSpec
from corral.store import Store, repo
from corral.types import AgentState, CancelMode, Decision, Mode
from tests.helpers import (
    KernelHarness,
    agent_session,
    alive,
    client,
    corral_serve,
    get_run,
    http_server,
    new_http_session,
    new_session,
    post,
    read_run,
    run_events,
    sqlite_url,
    sse_frames,
    until,
    wait_event,
    wait_run,
)

AGENT_PROGRAM = str(Path(__file__).with_name("acp_agent.py"))


def acp_spec(name: str = "coder", **env: str) -> AgentSpec:
    return AgentSpec.model_validate({"name": name, "driver": "acp", "acp": {
        "command": [sys.executable, AGENT_PROGRAM], "env": env, "cancel_grace_s": 0.5}})


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    config = KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=1.0, workspace_root=tmp_path / "ws")
    harness = KernelHarness(sqlite_url(tmp_path), config, agents=())
    try:
        yield await harness.start()
    finally:
        await harness.stop()


def pids_of(kernel: Kernel, agent: str) -> list[int]:
    folder = kernel.config.workspace_root / agent / "pids"
    return sorted(int(p.name) for p in folder.iterdir()) if folder.exists() else []


def agent_alive(pid: int) -> bool:
    """A process of the test's ACP program is running, or exited but was never reaped (a zombie
    is a leak too); its command line tells it apart from a process that got its pid later."""
    return alive(pid, command="acp_agent.py", zombies=True)


async def test_creating_a_slow_agent_returns_at_once_and_it_becomes_ready(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        began = time.perf_counter()
        agent = await kernel.agents.create(acp_spec(ACP_INIT_DELAY="2"))
        assert time.perf_counter() - began < 1.0, "create must not wait for initialize"
        assert agent.state is AgentState.STARTING
        ready = await kernel.agents.wait_ready("coder")
        assert ready.state is AgentState.READY
        assert [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)] == [ready.acp.child.pid]  # type: ignore[union-attr]


async def test_a_prompt_streams_its_answer_as_events(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "slow 5")
        events = await run_events(kernel, accepted.run_id)
        types = [e.type for e in events]
        assert types.count("message.delta") == 5
        assert types.index("message.delta") < types.index("run.completed")
        assert "".join(e.data["text"] for e in events if e.type == "message.delta") == "w0 w1 w2 w3 w4 "
        run = await get_run(kernel, accepted.run_id)
        assert run["status"] == "completed" and run["output"] == "w0 w1 w2 w3 w4 "


async def test_a_message_steered_in_during_a_prompt_is_the_next_prompt_of_the_run(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "slow 6")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        steer = await kernel.submit(session, "count", mode=Mode.STEER)
        assert steer.run_id == accepted.run_id
        run = await wait_run(kernel, accepted.run_id)
        assert run["output"] == "w0 w1 w2 w3 w4 w5 prompt 2"
        steered = [e for e in await run_events(kernel, accepted.run_id) if e.type == "run.steered"]
        assert [e.data["input_id"] for e in steered] == [steer.input_id]


async def test_each_corral_session_is_its_own_acp_session(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        first = await agent_session(kernel, acp_spec())
        second = await new_session(kernel, "coder")
        outputs = []
        for session in (first, first, second):
            accepted = await kernel.submit(session, "count")
            outputs.append((await wait_run(kernel, accepted.run_id))["output"])
        assert outputs == ["prompt 1", "prompt 2", "prompt 1"]


async def test_tool_calls_become_tool_events(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "tool")
        events = {e.type: e.data for e in await run_events(kernel, accepted.run_id)}
        assert events["tool.started"]["tool"] == "read notes.txt"
        assert events["tool.started"]["arguments"] == {"path": "notes.txt"}
        assert events["tool.completed"] == {"call_id": "t1", "tool": "read notes.txt", "result": "three lines",
                                            "is_error": False}


@pytest.mark.parametrize(("decision", "answer"), [(Decision.APPROVE, "allowed"), (Decision.DENY, "rejected")])
async def test_a_permission_request_becomes_an_approval(kernel: Kernel, decision: Decision, answer: str) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "ask write_file")
        request = await wait_event(kernel, session, "approval.requested", run_id=accepted.run_id)
        assert request.data == {"call_id": "call-1", "tool": "write_file", "arguments": {"path": "out.txt"}}
        await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id)
        assert (await get_run(kernel, accepted.run_id))["status"] == "waiting"
        await kernel.decide(accepted.run_id, "call-1", decision)
        run = await wait_run(kernel, accepted.run_id)
        assert (run["status"], run["output"]) == ("completed", answer)


async def test_cancelling_a_run_that_waits_for_approval_answers_cancelled(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        agent = kernel.agents.get("coder")
        accepted = await kernel.submit(session, "ask delete_everything")
        await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id)
        await kernel.cancel(accepted.run_id, CancelMode.SOFT)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled"
        assert run["output"] == "cancelled", "the program heard that nobody approved"
        assert kernel.agents.get("coder") is agent and agent.acp is not None, "a soft cancel kills nothing"


async def test_soft_cancel_sends_session_cancel_and_keeps_the_process(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        agent = kernel.agents.get("coder")
        accepted = await kernel.submit(session, "slow 400")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        await kernel.cancel(accepted.run_id, CancelMode.SOFT)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled" and run["output"].startswith("w0 ")
        assert kernel.agents.get("coder") is agent and agent.acp is not None, "the program keeps running"
        again = await kernel.submit(session, "count")
        assert (await wait_run(kernel, again.run_id))["output"] == "prompt 2", "and keeps its memory"


async def test_soft_cancel_of_an_agent_that_ignores_it_kills_after_the_grace(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        [first_pid] = pids_of(kernel, "coder")
        accepted = await kernel.submit(session, "stubborn")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        began = time.perf_counter()
        await kernel.cancel(accepted.run_id, CancelMode.SOFT)
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "cancelled" and run["output"] == "working "
        assert time.perf_counter() - began < 3.0
        await until(lambda: not agent_alive(first_pid))
        await kernel.agents.wait_ready("coder")  # killed on purpose: it starts again by itself
        again = await kernel.submit(session, "hello there")
        assert (await wait_run(kernel, again.run_id))["output"] == "hello there "


async def test_hard_cancel_kills_the_process_and_the_agent_restarts(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        generation = kernel.agents.get("coder").generation
        [first_pid] = pids_of(kernel, "coder")
        accepted = await kernel.submit(session, "slow 400")
        await wait_event(kernel, session, "message.delta", run_id=accepted.run_id)
        await kernel.cancel(accepted.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, accepted.run_id))["status"] == "cancelled"
        await until(lambda: not agent_alive(first_pid))
        await until(lambda: kernel.agents.get("coder").generation > generation)
        await kernel.agents.wait_ready("coder")
        again = await kernel.submit(session, "hi")
        assert (await wait_run(kernel, again.run_id))["output"] == "hi "
        assert [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)] != [first_pid]


async def test_stop_during_start_leaves_no_process_behind(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        await kernel.agents.create(acp_spec(ACP_INIT_DELAY="2"))
        await until(lambda: pids_of(kernel, "coder"))  # the program is up, still in initialize
        assert kernel.agents.get("coder").state is AgentState.STARTING
        await kernel.agents.delete("coder")
        assert not [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)]


async def test_start_stop_start_in_a_tight_loop_ends_with_one_live_process(kernel: Kernel) -> None:
    async with asyncio.timeout(30):
        spec = acp_spec(ACP_INIT_DELAY="0.3")
        for _ in range(3):
            await kernel.agents.create(spec)
            await kernel.agents.delete("coder")
        await kernel.agents.create(spec)
        for _ in range(3):
            await kernel.agents.restart("coder")
        await asyncio.gather(*(kernel.agents.restart("coder") for _ in range(3)))
        agent = await kernel.agents.wait_ready("coder")
        assert agent.acp is not None and agent.acp.child is not None
        assert [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)] == [agent.acp.child.pid]
        session = await new_session(kernel, "coder")
        accepted = await kernel.submit(session, "still works")
        assert (await wait_run(kernel, accepted.run_id))["output"] == "still works "


@pytest.mark.parametrize(("spec", "error"), [
    (acp_spec(ACP_FAIL_INIT="1"), "no credentials configured"),
    (AgentSpec.model_validate({"name": "coder", "driver": "acp", "acp": {"command": ["/nonexistent/agent"]}}),
     "cannot start '/nonexistent/agent'"),
    (AgentSpec.model_validate({"name": "coder", "driver": "acp", "acp": {
        "command": [sys.executable, AGENT_PROGRAM], "env": {"ACP_INIT_DELAY": "30"}, "startup_timeout_s": 0.5}}),
     "did not answer initialize and session/new within 0.5 s"),
])
async def test_a_failed_start_says_why(kernel: Kernel, spec: AgentSpec, error: str) -> None:
    async with asyncio.timeout(20):
        agent = await kernel.agents.create(spec)
        await agent.settled.wait()
        assert agent.state is AgentState.FAILED and error in (agent.error or "")
        assert not [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)]


async def test_an_agent_that_exits_fails_its_run_and_can_be_restarted(kernel: Kernel) -> None:
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "exit")
        run = await wait_run(kernel, accepted.run_id)
        assert run["status"] == "failed"
        assert run["error"]["code"] == "external_agent_error" and "exited (code 3)" in run["error"]["message"]
        await until(lambda: kernel.agents.get("coder").state is AgentState.FAILED)
        assert "restart" in (kernel.agents.get("coder").error or "")
        await kernel.agents.restart("coder")
        await kernel.agents.wait_ready("coder")
        again = await kernel.submit(session, "back again")
        assert (await wait_run(kernel, again.run_id))["output"] == "back again "


async def test_a_chatty_stderr_never_blocks_the_agent_and_reaches_the_log(
    kernel: Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.acp")
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec())
        accepted = await kernel.submit(session, "chatty 500")  # 500 KB: several times a pipe's buffer
        assert (await wait_run(kernel, accepted.run_id))["output"] == "done talking"
        await until(lambda: any("line 499 " in r.getMessage() for r in caplog.records))


async def test_the_program_gets_its_env_but_not_the_servers(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_API_TOKEN", "server-secret-token")
    async with asyncio.timeout(20):
        session = await agent_session(kernel, acp_spec(GREETING="hej"))
        outputs = []
        for name in ("GREETING", "CORRAL_API_TOKEN"):
            accepted = await kernel.submit(session, f"env {name}")
            outputs.append((await wait_run(kernel, accepted.run_id))["output"])
        assert outputs == ["hej", "unset"]


@pytest.mark.parametrize(("body", "message"), [
    ({"name": "x", "driver": "acp"}, 'driver "acp" needs an `acp` section'),
    ({"name": "x", "driver": "acp", "acp": {"command": ["a"]}, "system_prompt": "hi"}, "remove system_prompt"),
    ({"name": "x", "acp": {"command": ["a"]}}, 'needs driver "acp"'),
])
def test_bad_acp_specs_are_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentSpec.model_validate(body)


async def test_an_acp_agent_over_http(settings: Settings) -> None:
    """The whole face: create (answers `starting` at once), stream a prompt, approve, restart."""
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        body = {"name": "coder", "driver": "acp",
                "acp": {"command": [sys.executable, AGENT_PROGRAM], "env": {"ACP_INIT_DELAY": "0.5"}}}
        created = await http.post("/v1/agents", json=body)
        assert created.status_code == 201, created.text
        assert (created.json()["driver"], created.json()["state"]) == ("acp", "starting")
        await until_ready(http)
        session = await new_http_session(http, "coder")
        run = await post(http, session, "echo these words")
        frames = await read_run(http, run["run_id"])
        deltas = [f.json["text"] for f in frames if f.event == "message.delta"]
        assert deltas == ["echo ", "these ", "words "] and frames[-1].event == "run.completed"

        asked = await post(http, session, "ask write_file")
        async with http.stream("GET", f"/v1/runs/{asked['run_id']}/events") as response:
            async for frame in sse_frames(response):
                if frame.event == "approval.requested":
                    decided = await http.post(f"/v1/runs/{asked['run_id']}/approvals/call-1",
                                              json={"decision": "approve"})
                    assert decided.status_code < 300, decided.text
                if frame.event == "run.completed":
                    assert frame.json["output"] == "allowed"
                    break

        generation = created.json()["generation"]
        restarted = await http.post("/v1/agents/coder/restart")
        assert restarted.status_code == 200, restarted.text
        assert restarted.json()["generation"] > generation and restarted.json()["state"] == "starting"
        await until_ready(http)


async def until_ready(http: httpx.AsyncClient) -> None:
    # A client can only poll for this; the test's timeout bounds it.
    while (agent := (await http.get("/v1/agents/coder")).json())["state"] == "starting":  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert agent["state"] == "ready", agent


async def test_a_graceful_restart_requeues_a_run_waiting_on_the_program(tmp_path: Path) -> None:
    """Shutdown stops the prompt (its question is answered `cancelled`) and re-queues the message,
    which the next start asks again."""
    config = KernelConfig(interrupt_grace_s=0.5, shutdown_grace_s=2.0, workspace_root=tmp_path / "ws")
    harness = KernelHarness(sqlite_url(tmp_path), config, agents=())
    try:
        async with asyncio.timeout(30):
            kernel = await harness.start()
            session = await agent_session(kernel, acp_spec())
            accepted = await kernel.submit(session, "ask write_file")
            await wait_event(kernel, session, "run.waiting", run_id=accepted.run_id)
            await harness.stop()
            assert not [pid for pid in pids_of(kernel, "coder") if agent_alive(pid)]
            kernel = await harness.start()
            assert (await get_run(kernel, accepted.run_id))["status"] == "interrupted"
            requeued = await wait_event(kernel, session, "input.requeued")
            retry = requeued.data["run_id"]
            await wait_event(kernel, session, "approval.requested", run_id=retry)
            await kernel.decide(retry, "call-1", Decision.APPROVE)
            assert (await wait_run(kernel, retry))["output"] == "allowed"
    finally:
        await harness.stop()


async def test_after_kill_9_a_run_waiting_on_the_program_fails_when_decided(tmp_path: Path) -> None:
    """The program that asked died with the server (EOF on its stdin), so the decision cannot
    reach it: the run fails with a clear message instead of hanging, and the agent comes back."""
    workspace = tmp_path / "workspaces" / "coder"
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path) as server, client(server.base) as http:
            body = {"name": "coder", "driver": "acp", "acp": {"command": [sys.executable, AGENT_PROGRAM]}}
            assert (await http.post("/v1/agents", json=body)).status_code == 201
            await until_ready(http)
            session = await new_http_session(http, "coder")
            run = await post(http, session, "ask write_file")
            async with http.stream("GET", f"/v1/runs/{run['run_id']}/events") as response:
                async for frame in sse_frames(response):
                    if frame.event == "run.waiting":
                        break
            [first_pid] = (int(p.name) for p in (workspace / "pids").iterdir())
            server.proc.kill()
            await server.proc.wait()
        await until(lambda: not agent_alive(first_pid))  # the orphan saw EOF on its stdin and left
        async with corral_serve(tmp_path) as server, client(server.base) as http:
            assert (await http.get(f"/v1/runs/{run['run_id']}")).json()["status"] == "waiting"
            await until_ready(http)
            decided = await http.post(f"/v1/runs/{run['run_id']}/approvals/call-1", json={"decision": "approve"})
            assert decided.status_code < 300, decided.text
            frames = await read_run(http, run["run_id"])
            assert frames[-1].event == "run.failed"
            assert "did not survive a restart" in frames[-1].json["error"]["message"]
            again = await post(http, session, "count")
            assert (await read_run(http, again["run_id"]))[-1].json["output"] == "prompt 1"


async def test_an_external_agents_session_is_titled_from_its_first_words(tmp_path: Path) -> None:
    """No Corral model to ask: the reflector titles the session with the first line of the
    first message that has text (one of only blanks is passed over)."""
    config = KernelConfig(shutdown_grace_s=1.0, workspace_root=tmp_path / "ws")
    kernel = Kernel(Store(sqlite_url(tmp_path)), config)
    reflector = install_reflector(kernel, ReflectorConfig(summary_every=1))
    async with asyncio.timeout(30), kernel.running():
        session = await agent_session(kernel, acp_spec())
        for turn, text in enumerate(("   ", "plan the release\nand then ship it")):
            assert (await wait_run(kernel, (await kernel.submit(session, text)).run_id))["status"] == "completed"
            await reflector.wait_reflected(turn + 1)
        assert reflector.failed == 0
        row = await kernel.store.read(repo.get_session, session)
        assert row is not None and row.title == "plan the release" and row.summary is None
