"""``shell``: a command in the agent's workspace, in a process group of its own.

The group is what makes the tool safe to stop: on a timeout, a cancel, or when the command
itself exits, every process it started is killed with it, so nothing outlives the call.
The child gets a minimal environment, never the server's (which may hold API keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import ToolError
from corral.tools.base import Tool, ToolContext
from corral.tools.config import ToolSettings

TERM_GRACE_S = 1.0


class ShellArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=100_000, description="a /bin/sh command line")
    timeout_s: float | None = Field(None, gt=0, description="time limit in seconds (default from settings)")


def safe_env(workspace: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": str(workspace),
            "LANG": "C.UTF-8", "TERM": "dumb"}


class _Capped:
    """Keeps the first ``limit`` bytes and counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        out = self.kept.decode(errors="replace")
        return out + (f"\n[... {self.dropped} more bytes cut]" if self.dropped else "")


class _Child:
    """A process this module starts, watches and reaps itself.

    asyncio's child watcher on Python 3.11 can lose an exit once event loops have come and
    gone (seen in the test suite: ``wait()`` then never returns). So the process is started
    with ``subprocess.Popen``, which asyncio does not watch, its exit is awaited through a
    pidfd on the loop, and it is reaped here; its output pipe is read through the loop.
    """

    def __init__(self, process: subprocess.Popen[bytes]):
        self.process = process
        self.pid = process.pid
        self._pidfd = os.pidfd_open(process.pid)
        self._exited = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        code = self.process.wait()  # it has exited: this reaps it without blocking
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _end_group(child: _Child, *, at_once: bool) -> None:
    """Stop every process of the group: SIGTERM with a grace, or SIGKILL at once."""
    if not at_once:
        _signal_group(child.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERM_GRACE_S):
                await child.wait()
    _signal_group(child.pid, signal.SIGKILL)
    await child.wait()


async def _read_pipe(pipe: IO[bytes], into: _Capped) -> None:
    """Read the pipe to its end through the loop, so a chatty command never blocks on a full pipe."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while chunk := await reader.read(65_536):
            into.add(chunk)
    finally:
        transport.close()


def shell_tool(settings: ToolSettings) -> Tool:
    async def shell(args: ShellArgs, context: ToolContext) -> str:
        workspace = context.workspace
        await asyncio.to_thread(workspace.mkdir, parents=True, exist_ok=True)
        limit = min(args.timeout_s or settings.shell_timeout_s, settings.shell_max_timeout_s)
        # Popen's fork and exec take about a millisecond: not worth a thread hop.
        process = subprocess.Popen(  # noqa: ASYNC220
            ["/bin/sh", "-c", args.command], cwd=workspace, env=safe_env(workspace), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        child = _Child(process)
        output = _Capped(settings.max_output_bytes)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(limit):
                reader = asyncio.create_task(_read_pipe(process.stdout, output))
                try:
                    code = await child.wait()
                    # The command is done: what it left running in the background goes with it,
                    # which also closes the pipe those processes held.
                    _signal_group(child.pid, signal.SIGKILL)
                    await reader
                finally:
                    reader.cancel()
        except TimeoutError:
            await asyncio.shield(_end_group(child, at_once=False))
            raise ToolError(f"the command timed out after {limit:g} s and was killed; output so far:\n"
                            f"{output.text()}") from None
        except asyncio.CancelledError:
            await asyncio.shield(_end_group(child, at_once=True))
            raise
        return f"exit code {code}\n{output.text()}"

    return Tool("shell", "Run a /bin/sh command in the agent's workspace; returns the exit code and output.",
                ShellArgs, shell, spawns_process=True)
