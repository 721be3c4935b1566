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
from pathlib import Path

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


async def _exit_code(process: asyncio.subprocess.Process) -> int:
    """Wait for the process to exit, through a pidfd, without reaping it (asyncio's child
    watcher does that). Watching the pidfd ourselves keeps this independent of the watcher,
    which on Python 3.11 can miss an exit when event loops come and go (as in tests)."""
    if process.returncode is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # already reaped: the watcher has, or soon will have, its code
        return await process.wait()
    exited: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await exited
        # The pidfd said it exited: with WNOHANG this cannot block, and WNOWAIT leaves the reaping to asyncio.
        status = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT | os.WNOHANG)  # noqa: ASYNC222
    except ChildProcessError:  # reaped between the wake-up and the look
        return await process.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    if status is None:
        return await process.wait()
    return status.si_status if status.si_code == os.CLD_EXITED else -status.si_status


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _end_group(process: asyncio.subprocess.Process, *, at_once: bool) -> None:
    """Stop every process of the group: SIGTERM with a grace, or SIGKILL at once."""
    if not at_once:
        _signal_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERM_GRACE_S):
                await _exit_code(process)
    _signal_group(process.pid, signal.SIGKILL)
    await _exit_code(process)


def shell_tool(settings: ToolSettings) -> Tool:
    async def shell(args: ShellArgs, context: ToolContext) -> str:
        workspace = context.workspace
        await asyncio.to_thread(workspace.mkdir, parents=True, exist_ok=True)
        limit = min(args.timeout_s or settings.shell_timeout_s, settings.shell_max_timeout_s)
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", args.command, cwd=workspace, env=safe_env(workspace), start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output = _Capped(settings.max_output_bytes)

        async def read_all() -> None:
            assert process.stdout is not None
            while chunk := await process.stdout.read(65_536):
                output.add(chunk)

        try:
            async with asyncio.timeout(limit):
                reader = asyncio.create_task(read_all())
                try:
                    code = await _exit_code(process)
                    # The command is done: what it left running in the background goes with it,
                    # which also closes the pipe those processes held.
                    _signal_group(process.pid, signal.SIGKILL)
                    await reader
                finally:
                    reader.cancel()
        except TimeoutError:
            await asyncio.shield(_end_group(process, at_once=False))
            raise ToolError(f"the command timed out after {limit:g} s and was killed; output so far:\n"
                            f"{output.text()}") from None
        except asyncio.CancelledError:
            await asyncio.shield(_end_group(process, at_once=True))
            raise
        return f"exit code {code}\n{output.text()}"

    return Tool("shell", "Run a /bin/sh command in the agent's workspace; returns the exit code and output.",
                ShellArgs, shell, spawns_process=True)
