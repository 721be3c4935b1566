"""Real processes: ``corral serve`` on a free port, and whether a process is still alive."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers.http import free_port

CORRAL = Path(sys.executable).with_name("corral")
STARTUP_DEADLINE_S = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its CORRAL_* settings, which would leak into the processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return {**env, **extra}


@dataclass
class Server:
    """A ``corral serve`` process started by ``corral_serve``, and what it printed."""

    proc: asyncio.subprocess.Process
    base: str
    output: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.output[-60:])


@asynccontextmanager
async def corral_serve(data_dir: Path, *, file_size_limit: int | None = None, **env: str) -> AsyncIterator[Server]:
    """``corral serve`` on a free port, ready (``/healthz`` answers); always killed at the end.

    ``file_size_limit`` starts it with that ``RLIMIT_FSIZE`` (soft; the hard limit stays
    unlimited, so a test can lift it with ``resource.prlimit`` without privileges): a write past
    that offset of any file fails with EFBIG, as on a full disk (CPython ignores SIGXFSZ).
    """
    port = free_port()

    def limit_file_size() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    proc = await asyncio.create_subprocess_exec(
        str(CORRAL), "serve", "--port", str(port), "--data-dir", str(data_dir),
        env=clean_env(**{"CORRAL_LOG_LEVEL": "warning", **env}), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, preexec_fn=limit_file_size if file_size_limit is not None else None,
    )
    assert proc.stdout is not None
    server = Server(proc, f"http://127.0.0.1:{port}")
    drain = asyncio.create_task(_drain(proc.stdout, server.output))
    try:
        await _wait_healthy(server)
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await drain


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace"))


async def _wait_healthy(server: Server) -> None:
    """Poll the external process until it answers, within a bounded deadline."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    async with httpx.AsyncClient(base_url=server.base, timeout=2.0) as http:
        while True:
            assert server.proc.returncode is None, f"corral serve exited during start-up:\n{server.log}"
            with suppress(httpx.TransportError):
                if (await http.get("/healthz")).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"corral serve not healthy after {STARTUP_DEADLINE_S} s:\n{server.log}"
            await asyncio.sleep(0.05)


def alive(pid: int, *, command: str | None = None, zombies: bool = False) -> bool:
    """Whether process ``pid`` is still there: not gone and, given ``command``, with a command
    line that names it (an unrelated process may get a pid only after its owner was reaped).

    A zombie (dead, not reaped yet) counts as alive only with ``zombies``: for a process Corral
    must reap itself, an unreaped child is a leak too.
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return zombies
        return command is None or command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


async def until_gone(*pids: int, within: float = 5.0) -> None:
    """Wait until none of ``pids`` is alive (a zombie left to init counts as gone), for at most ``within`` s."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[pid for pid in pids if alive(pid)]}"
        await asyncio.sleep(0.01)
