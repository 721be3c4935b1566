"""The terminal client against a real ``corral serve`` process, as a user (or a script) would run it.

The server is a subprocess on a free port; readiness is its own "startup complete" log line
(read by a thread, so nothing polls or sleeps), and it is always stopped at the end.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import CORRAL, STARTUP_DEADLINE_S, clean_env, free_port

READY_LINE = "Application startup complete"


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    output: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.output[-60:])

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10.0)


@contextmanager
def corral_serve(data_dir: Path, port: int | None = None, **env: str) -> Iterator[Server]:
    """``corral serve`` ready for requests; killed at the end (tests do not depend on its shutdown)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [str(CORRAL), "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=clean_env(CORRAL_LOG_LEVEL="info", **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    server = Server(proc, port)
    ready = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.output.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()  # it exited: stop waiting, the assertion below says why

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(STARTUP_DEADLINE_S), f"corral serve not ready in {STARTUP_DEADLINE_S} s:\n{server.log}"
        assert proc.poll() is None, f"corral serve exited during start-up:\n{server.log}"
        yield server
    finally:
        kill(server)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def kill(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(timeout=10)
