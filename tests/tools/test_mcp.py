"""MCP tools: servers start in the background, their tools reach runs, a dead server is
restarted, deleting the agent kills its server, and a broken server is visible via the API.

Every server here is a real process (``mcp_server_fixture.py``), over stdio or streamable HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from corral.errors import ToolError
from corral.kernel import Kernel
from corral.settings import Settings
from corral.specs import AgentPolicy, AgentSpec, McpServerSpec
from corral.tools.base import ToolContext
from corral.tools.mcp import McpState, McpStatus
from corral.types import Approval, CancelMode
from tests.helpers import (
    POLL_S,
    KernelHarness,
    alive,
    client,
    free_port,
    http_server,
    new_session,
    until,
    wait_event,
    wait_run,
)

FIXTURE = Path(__file__).with_name("mcp_server_fixture.py")
STDIO = {"name": "fixture", "command": [sys.executable, str(FIXTURE)]}


def agent_spec(name: str, *servers: dict[str, Any], **extra: Any) -> AgentSpec:
    return AgentSpec.model_validate({"name": name, "mcp_servers": list(servers), **extra})


def status(kernel: Kernel, agent: str, server: str = "fixture") -> McpStatus:
    supervisor = kernel.agents.get(agent).mcp
    assert supervisor is not None
    [found] = [s for s in supervisor.statuses() if s.name == server]
    return found


async def wait_state(kernel: Kernel, agent: str, state: McpState, server: str = "fixture",
                     min_restarts: int = 0) -> McpStatus:
    """Poll until the server reaches ``state``; the caller's ``asyncio.timeout`` bounds it."""
    while True:
        current = status(kernel, agent, server)
        if current.state is state and current.restarts >= min_restarts:
            return current
        await asyncio.sleep(POLL_S)


async def call(kernel: Kernel, agent: str, tool: str, arguments: dict[str, Any]) -> str:
    """One tool call straight through the agent's tool set, as the runner makes it."""
    context = ToolContext("run_test", "ses_test", agent, Path("."))
    return await kernel.agents.get(agent).tools[tool].call(arguments, context)


async def ask(kernel: Kernel, session: str, content: str) -> dict[str, Any]:
    accepted = await kernel.submit(session, content)
    return await wait_run(kernel, accepted.run_id)


# --- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("server, message", [
    ({"name": "x"}, "exactly one of"),
    ({"name": "x", "command": ["a"], "url": "http://h/mcp"}, "exactly one of"),
    ({"name": "x.y", "command": ["a"]}, "MCP server names"),
    ({"name": "1x", "command": ["a"]}, "MCP server names"),
    ({"name": "x", "command": []}, "at least 1"),
    ({"name": "x", "url": "ftp://h/mcp"}, "http:// or https://"),
    ({"name": "x", "url": "http://h/mcp", "env": {"A": "1"}}, "go with `command`"),
    ({"name": "x", "command": ["a"], "headers": {"A": "1"}}, "go with `url`"),
    ({"name": "x", "command": ["a"], "shell": True}, "Extra inputs"),
])
def test_server_specs_are_validated(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        agent_spec("a", server)


def test_server_names_are_unique_within_an_agent() -> None:
    with pytest.raises(ValidationError, match="repeated: s"):
        agent_spec("a", {"name": "s", "command": ["a"]}, {"name": "s", "url": "http://h/mcp"})
    spec = agent_spec("a", {"name": "s", "command": ["a"], "env": {"K": "v"}}, {"name": "t", "url": "https://h/mcp"})
    assert [s.name for s in spec.mcp_servers] == ["s", "t"]
    assert isinstance(spec.mcp_servers[0], McpServerSpec)


# --- stdio -------------------------------------------------------------------------------


async def test_creation_returns_at_once_and_a_run_calls_the_server(kernel: Kernel) -> None:
    async with asyncio.timeout(30):
        began = time.monotonic()
        agent = await kernel.agents.create(agent_spec("tooly", STDIO))
        assert time.monotonic() - began < 0.5, "creating an agent must not wait for its MCP servers"
        assert status(kernel, "tooly").state is McpState.STARTING
        await kernel.agents.wait_ready("tooly")  # the provider alone decides readiness
        up = await wait_state(kernel, "tooly", McpState.UP)
        assert up.tools == ("fixture.add", "fixture.slow", "fixture.pid") and up.error is None
        spec = agent.tools["fixture.add"].spec()
        assert spec.parameters["properties"].keys() == {"a", "b"}, "the schema is the server's inputSchema"
        assert {"wait", "echo"} <= agent.tools.keys(), "built-in tools stay"

        session = await new_session(kernel, "tooly")
        run = await ask(kernel, session, '/tool fixture.add {"a": 2, "b": 3}')
        assert run["status"] == "completed" and run["output"] == "tool results: 5"
        run = await ask(kernel, session, '/tool fixture.add {"a": "two", "b": 3}')
        assert run["status"] == "completed" and "error: " in run["output"] and "valid integer" in run["output"]


async def test_a_killed_server_is_restarted_and_works_again(kernel: Kernel) -> None:
    async with asyncio.timeout(30):
        await kernel.agents.create(agent_spec("phoenix", STDIO))
        await wait_state(kernel, "phoenix", McpState.UP)
        session = await new_session(kernel, "phoenix")
        first = int((await ask(kernel, session, "/tool fixture.pid {}"))["output"].removeprefix("tool results: "))

        os.kill(first, signal.SIGKILL)
        down = status(kernel, "phoenix")
        while down.state is McpState.UP:  # the stream's end is noticed at once, not at the next call
            await asyncio.sleep(POLL_S)
            down = status(kernel, "phoenix")
        assert down.error == "the server closed the connection"
        run = await ask(kernel, session, '/tool fixture.add {"a": 2, "b": 3}')
        assert run["status"] == "completed"
        assert run["output"] in ("tool results: 5", "tool results: error: MCP server fixture is down (restarting): "
                                 "the server closed the connection"), run["output"]

        up = await wait_state(kernel, "phoenix", McpState.UP, min_restarts=1)
        assert up.error is None
        assert await call(kernel, "phoenix", "fixture.add", {"a": 20, "b": 22}) == "42"
        second = int(await call(kernel, "phoenix", "fixture.pid", {}))
        assert second != first and not alive(first)


async def test_calls_time_out_and_a_cancelled_call_leaves_the_session_usable(kernel: Kernel) -> None:
    async with asyncio.timeout(30):
        await kernel.agents.create(agent_spec("patient", {**STDIO, "timeout_s": 0.3}))
        await wait_state(kernel, "patient", McpState.UP)
        began = time.monotonic()
        with pytest.raises(ToolError, match=r"fixture.slow timed out after 0.3 s"):
            await call(kernel, "patient", "fixture.slow", {"ms": 5000})
        assert time.monotonic() - began < 1.5
        assert await call(kernel, "patient", "fixture.add", {"a": 1, "b": 1}) == "2"

        # A run hard-cancelled in the middle of an MCP call: the server session survives it.
        session = await new_session(kernel, "patient")
        accepted = await kernel.submit(session, '/tool fixture.slow {"ms": 200}\n/tool fixture.slow {"ms": 250}')
        await wait_event(kernel, session, "tool.started", run_id=accepted.run_id)
        await kernel.cancel(accepted.run_id, CancelMode.HARD)
        assert (await wait_run(kernel, accepted.run_id))["status"] == "cancelled"
        with pytest.raises(TimeoutError):  # cancelled by the caller, in flight on the server
            await asyncio.wait_for(call(kernel, "patient", "fixture.slow", {"ms": 250}), 0.1)
        assert status(kernel, "patient").state is McpState.UP
        run = await ask(kernel, session, '/tool fixture.add {"a": 2, "b": 3}')
        assert run["output"] == "tool results: 5"


async def test_the_approval_policy_names_mcp_tools_in_full(kernel: Kernel) -> None:
    async with asyncio.timeout(30):
        policy = AgentPolicy(approvals={"fixture.add": Approval.ASK, "fixture.pid": Approval.DENY})
        await kernel.agents.create(agent_spec("careful", STDIO, policy=policy.model_dump()))
        await wait_state(kernel, "careful", McpState.UP)
        session = await new_session(kernel, "careful")
        run = await ask(kernel, session, "/tool fixture.pid {}")
        assert run["output"] == "tool results: error: the policy denies the tool fixture.pid"
        accepted = await kernel.submit(session, '/tool fixture.add {"a": 2, "b": 3}')
        request = await wait_event(kernel, session, "approval.requested", run_id=accepted.run_id)
        assert request.data["tool"] == "fixture.add"
        await kernel.cancel(accepted.run_id, CancelMode.HARD)


async def test_deleting_the_agent_kills_its_servers_even_while_starting(kernel: Kernel, tmp_path: Path) -> None:
    async with asyncio.timeout(30):
        await kernel.agents.create(agent_spec("brief", STDIO))
        await wait_state(kernel, "brief", McpState.UP)
        pid = int(await call(kernel, "brief", "fixture.pid", {}))
        tools = kernel.agents.get("brief").tools
        await kernel.agents.delete("brief")
        assert not alive(pid), "delete returns once the server process is gone"
        with pytest.raises(ToolError, match="MCP server fixture is stopped"):
            await tools["fixture.add"].call({"a": 1, "b": 2}, ToolContext("r", "s", "brief", tmp_path))

        pid_file = tmp_path / "starting.pid"
        await kernel.agents.create(agent_spec("hasty", {**STDIO, "command": [*STDIO["command"], "--pid-file",
                                                                                str(pid_file)]}))
        await until(lambda: pid_file.exists() and pid_file.read_text() != "")
        assert status(kernel, "hasty").state is McpState.STARTING
        began = time.monotonic()
        await kernel.agents.delete("hasty")
        assert not alive(int(pid_file.read_text()))
        assert time.monotonic() - began < 5.0


async def test_stopping_the_service_kills_the_servers(tmp_path: Path) -> None:
    harness = KernelHarness(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}",
                            agents=(agent_spec("assistant", STDIO),))
    async with asyncio.timeout(30):
        kernel = await harness.start()
        try:
            await wait_state(kernel, "assistant", McpState.UP)
            pid = int(await call(kernel, "assistant", "fixture.pid", {}))
        finally:
            await harness.stop()
        assert not alive(pid)


async def test_a_server_that_cannot_start_is_down_with_its_error_in_the_api(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        servers = [
            {"name": "missing", "command": [str(tmp_path / "no-such-server")]},
            {"name": "quitter", "command": [sys.executable, "-c", "raise SystemExit(3)"]},
            {"name": "good", **{k: v for k, v in STDIO.items() if k != "name"}},
        ]
        began = time.monotonic()
        created = await http.post("/v1/agents", json={"name": "shaky", "mcp_servers": servers})
        assert created.status_code == 201, created.text
        assert time.monotonic() - began < 0.5
        assert [s["state"] for s in created.json()["mcp_servers"]] == ["starting"] * 3

        while True:
            body = (await http.get("/v1/agents/shaky")).json()
            states = {s["name"]: s for s in body["mcp_servers"]}
            if states["missing"]["state"] == "down" and states["quitter"]["error"] and states["good"]["state"] == "up":
                break
            await asyncio.sleep(POLL_S)
        assert body["state"] == "ready", "a broken MCP server does not fail its agent"
        missing = str(tmp_path / "no-such-server")
        assert states["missing"]["error"] == f"cannot run {missing!r}: No such file or directory"
        assert "closed the connection while starting" in states["quitter"]["error"]
        assert states["missing"]["tools"] == [] and "good.add" in states["good"]["tools"]

        bad = await http.post("/v1/agents", json={"name": "bad", "mcp_servers": [{"name": "a.b", "command": ["x"]}]})
        assert bad.status_code == 422 and "MCP server names" in bad.text


# --- streamable HTTP ------------------------------------------------------------------------


@asynccontextmanager
async def http_fixture(port: int) -> AsyncIterator[None]:
    """The fixture serving streamable HTTP on ``port`` (quietly: uvicorn logs every request)."""
    process = await asyncio.create_subprocess_exec(sys.executable, str(FIXTURE), "--http", str(port),
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        process.kill()
        await process.wait()


async def test_a_streamable_http_server(kernel: Kernel) -> None:
    port = free_port()
    async with asyncio.timeout(40):
        async with http_fixture(port):
            await kernel.agents.create(agent_spec("remote", {"name": "web", "url": f"http://127.0.0.1:{port}/mcp",
                                                             "headers": {"X-Test": "1"}}))
            up = await wait_state(kernel, "remote", McpState.UP, server="web")
            assert up.tools == ("web.add", "web.slow", "web.pid")
            session = await new_session(kernel, "remote")
            run = await ask(kernel, session, '/tool web.add {"a": 2, "b": 3}')
            assert run["output"] == "tool results: 5"

        with pytest.raises(ToolError, match="MCP server web is (down|still)"):
            await call(kernel, "remote", "web.add", {"a": 1, "b": 1})
        assert status(kernel, "remote", "web").state is not McpState.UP
        async with http_fixture(port):
            await wait_state(kernel, "remote", McpState.UP, server="web", min_restarts=1)
            assert await call(kernel, "remote", "web.add", {"a": 1, "b": 1}) == "2"
