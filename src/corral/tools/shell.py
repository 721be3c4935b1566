"""``shell``: a command in the agent's workspace, in a process group of its own.

The group is what makes the tool safe to stop: on a timeout, a cancel, or when the command
itself exits, every process it started is killed with it, so nothing outlives the call.
The child gets a minimal environment, never the server's (which may hold API keys).

Not a sandbox: the command runs as the server's user and can read what that user can. A
process that leaves the group (``setsid``) escapes the kill; the call then stops reading its
output after a grace instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from corral.childproc import ChildProcess
from corral.errors import ToolError
from corral.tools.base import Tool, ToolContext
from corral.tools.config import ToolSettings

# After the command and its group are gone, how long to wait for the output pipe to close: only
# a process that left the group (setsid) can still hold it.
PIPE_GRACE_S = 1.0


class ShellArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=100_000, description="a /bin/sh command line")
    timeout_s: float | None = Field(None, gt=0, description="time limit in seconds (default from settings)")


def safe_env(workspace: Path) -> dict[str, str]:
    """Built from nothing, not filtered from the server's: a filter misses the secret it has no rule for."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": str(workspace),
            "LANG": "C.UTF-8", "TERM": "dumb"}


class _Capped:
    """Keeps the first ``limit`` bytes and counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0
        self.notes: list[str] = []

    def __repr__(self) -> str:
        return f"<_Capped {len(self.kept)}/{self.limit} bytes kept, {self.dropped} dropped>"

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        out = self.kept.decode(errors="replace")
        out += f"\n[... {self.dropped} more bytes cut]" if self.dropped else ""
        return "\n".join([out, *self.notes]) if self.notes else out


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
        try:
            # Popen's fork and exec take about a millisecond: not worth a thread hop.
            process = subprocess.Popen(  # noqa: ASYNC220
                ["/bin/sh", "-c", args.command], cwd=workspace, env=safe_env(workspace), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise ToolError(f"cannot start /bin/sh: {exc.strerror}") from None
        child = ChildProcess(process)
        output = _Capped(settings.max_output_bytes)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(limit):
                reader = asyncio.create_task(_read_pipe(process.stdout, output))
                try:
                    await child.wait_exited()
                    # The command is done: what it left running in the background goes with it,
                    # which also closes the pipe those processes held.
                    code = child.reap()
                    done, _ = await asyncio.wait({reader}, timeout=PIPE_GRACE_S)
                    if reader in done:
                        reader.result()
                    else:
                        output.note("[output pipe still held by a process that left the command's process group; "
                                    "stopped reading]")
                finally:
                    reader.cancel()
        except TimeoutError:
            await asyncio.shield(child.end(at_once=False))
            raise ToolError(f"the command timed out after {limit:g} s and was killed; output so far:\n"
                            f"{output.text()}") from None
        except asyncio.CancelledError:
            await asyncio.shield(child.end(at_once=True))
            raise
        return f"exit code {code}\n{output.text()}"

    return Tool("shell", "Run a /bin/sh command in the agent's workspace; returns the exit code and output.",
                ShellArgs, shell, spawns_process=True)
