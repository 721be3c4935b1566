"""``shell``: output and exit code, time limits and cancels that kill the whole process tree, caps, env."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from corral.errors import ToolError
from corral.tools import ToolContext, ToolSettings
from corral.tools.shell import shell_tool
from tests.helpers import until, until_gone

LIMIT = 30


def context(tmp_path: Path) -> ToolContext:
    return ToolContext("run_t", "ses_t", "agent", tmp_path / "ws")


async def test_output_exit_code_and_the_workspace_as_cwd(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings())
        result = await tool.call({"command": "pwd; echo oops >&2; exit 3"}, context(tmp_path))
        assert result == f"exit code 3\n{(tmp_path / 'ws').resolve()}\noops\n"


async def test_a_timeout_kills_the_command_and_what_it_started(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings())
        pids_file = tmp_path / "ws" / "pids"
        command = f"sleep 60 & echo $! > {pids_file}; echo $$ >> {pids_file}; sleep 60"
        began = time.monotonic()
        with pytest.raises(ToolError, match="timed out after 0.5 s"):
            await tool.call({"command": command, "timeout_s": 0.5}, context(tmp_path))
        assert time.monotonic() - began < 3
        pids = [int(line) for line in pids_file.read_text().split()]
        assert len(pids) == 2
        await until_gone(*pids)


async def test_a_cancel_kills_the_tree_within_100_ms(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings())
        pids_file = tmp_path / "ws" / "pids"
        staged = f"{pids_file}.tmp"
        command = f"sleep 60 & echo $! > {staged}; echo $$ >> {staged}; mv {staged} {pids_file}; wait"
        call = asyncio.create_task(tool.call({"command": command}, context(tmp_path)))
        async with asyncio.timeout(10):
            await until(pids_file.exists)  # the command has started both processes
        pids = [int(line) for line in pids_file.read_text().split()]
        began = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until_gone(*pids, within=0.1)
        assert time.monotonic() - began < 0.1


async def test_background_processes_end_with_the_command(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings())
        result = await tool.call({"command": "sleep 60 & echo $!"}, context(tmp_path))
        pid = int(result.split("\n")[1])
        await until_gone(pid)


async def test_output_is_capped_and_a_flood_does_not_hang(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings(max_output_bytes=2048))
        result = await tool.call({"command": "head -c 10000000 /dev/zero | tr '\\0' x"}, context(tmp_path))
        assert result.startswith("exit code 0\n" + "x" * 2048)
        assert result.endswith(f"[... {10_000_000 - 2048} more bytes cut]")


async def test_the_server_environment_is_not_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with asyncio.timeout(LIMIT):
        monkeypatch.setenv("CORRAL_API_TOKEN", "secret-one")
        monkeypatch.setenv("OPENAI_API_KEY", "secret-two")
        result = await shell_tool(ToolSettings()).call({"command": "env"}, context(tmp_path))
        assert "secret-one" not in result and "secret-two" not in result
        assert f"HOME={tmp_path / 'ws'}" in result


async def test_the_time_limit_is_capped_by_the_settings(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        tool = shell_tool(ToolSettings(shell_timeout_s=100, shell_max_timeout_s=0.3))
        with pytest.raises(ToolError, match="timed out after 0.3 s"):
            await tool.call({"command": "echo started; sleep 60", "timeout_s": 500}, context(tmp_path))


async def test_a_process_that_leaves_the_group_does_not_hold_the_call(tmp_path: Path) -> None:
    """``setsid`` escapes the group kill; the call still returns, after a grace, saying why."""
    async with asyncio.timeout(LIMIT):
        command = "setsid sh -c 'touch own_session; exec sleep 60' & echo $!; until [ -e own_session ]; do :; done"
        result = await shell_tool(ToolSettings()).call({"command": command}, context(tmp_path))
        escaped = int(result.split("\n")[1])
        try:
            assert result.startswith("exit code 0\n")
            assert "left the command's process group" in result
        finally:
            os.kill(escaped, signal.SIGKILL)
