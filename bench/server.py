"""Start and stop a real `corral serve` on loopback with a fresh SQLite file.

`corral_server` yields only the base URL (what the chat and web benches need); `fresh_server`
and `serve` yield a `Server`, which the suite needs to read the process's memory and CPU, send
it SIGTERM or SIGKILL, and start a second server on the same data directory (recovery).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS, in KiB) as the kernel accounts it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used; the difference over a window is its load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM, then wait for the exit; returns the seconds it took (sync: callers time it)."""
        began = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return time.perf_counter() - began

    def kill(self) -> None:
        """SIGKILL: the crash the recovery scenario survives."""
        self.process.kill()
        self.process.wait()


@asynccontextmanager
async def serve(data_dir: Path, env: dict[str, str] | None = None, poll_s: float = 0.05) -> AsyncIterator[Server]:
    """A server on an existing (possibly used) data directory, stopped with SIGTERM after;
    ``/healthz`` is polled every ``poll_s`` until it answers."""
    port = free_port()
    command = [sys.executable, "-m", "corral", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    log, process = _spawn(command, {**os.environ, "CORRAL_LOG_LEVEL": "warning", **(env or {})}, data_dir)
    server = Server(f"http://127.0.0.1:{port}", process, data_dir)
    try:
        try:
            await _wait_healthy(server.base, process, poll_s=poll_s)
        except RuntimeError as exc:
            log.flush()
            tail = (data_dir / "server.log").read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{exc}; the end of its log:\n" + "\n".join(tail)) from None
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@asynccontextmanager
async def fresh_server(env: dict[str, str] | None = None) -> AsyncIterator[Server]:
    """A server on a new, empty data directory that is thrown away after."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as data_dir:
        async with serve(Path(data_dir), env) as server:
            yield server


@asynccontextmanager
async def corral_server(env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Yields the base URL of a fresh server; its data directory is thrown away after."""
    async with fresh_server(env) as server:
        yield server.base


def _spawn(command: list[str], env: dict[str, str], data_dir: Path) -> tuple[IO[bytes], subprocess.Popen[bytes]]:
    """Start the server with its output in a log file (sync: it only forks)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - the caller closes it
    return log, subprocess.Popen(command, env=env, stdout=log, stderr=log)


async def wait_answering(url: str, process: subprocess.Popen[bytes], *, within: float, poll_s: float,
                         fail: Callable[[str], Exception]) -> None:
    """Poll ``url`` until it answers 200; ``fail(why)`` if the process exits or time runs out."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise fail(f"exited with {process.returncode}")
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(poll_s)
    raise fail(f"did not answer {url} within {within:g} s")


async def _wait_healthy(base: str, process: subprocess.Popen[bytes], within: float = 60.0,
                        poll_s: float = 0.05) -> None:
    await wait_answering(f"{base}/healthz", process, within=within, poll_s=poll_s,
                         fail=lambda why: RuntimeError(f"corral serve {why}"))
