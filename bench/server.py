"""Start and stop a real `corral serve` on loopback with a fresh SQLite file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def corral_server(env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Yields the base URL of a fresh server; its data directory is thrown away after."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as data_dir:
        port = free_port()
        command = [sys.executable, "-m", "corral", "serve", "--port", str(port), "--data-dir", data_dir]
        log, process = _spawn(command, {**os.environ, "CORRAL_LOG_LEVEL": "warning", **(env or {})}, data_dir)
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_healthy(base, process)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _spawn(command: list[str], env: dict[str, str], data_dir: str) -> tuple[IO[bytes], subprocess.Popen[bytes]]:
    """Start the server with its output in a log file (sync: it only forks)."""
    log = open(Path(data_dir) / "server.log", "wb")  # noqa: SIM115 - the caller closes it
    return log, subprocess.Popen(command, env=env, stdout=log, stderr=log)


async def _wait_healthy(base: str, process: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"corral serve exited with {process.returncode}")
            try:
                async with http.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("corral serve did not become healthy in time")
