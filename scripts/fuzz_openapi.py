"""``make fuzz``: schemathesis against a fresh ``corral serve``, from its own ``/openapi.json``.

    .venv/bin/python scripts/fuzz_openapi.py [--database-url URL] [SCHEMATHESIS RUN OPTIONS...]

Starts the server on a free loopback port with a temporary data directory (SQLite unless
``--database-url`` names another store), runs ``schemathesis run`` with ``--workers 1`` and the
``not_a_server_error`` check (a 5xx is the failure; 4xx answers to generated junk are expected),
then stops the server. Options after the script's own go to schemathesis unchanged, e.g.
``--max-examples 5 --phases fuzzing`` for a short run. The exit status is schemathesis's, or 1
when the server wrote a traceback to its log even though every answer looked fine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
STARTUP_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"corral serve exited at start-up with status {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"corral serve did not answer within {STARTUP_S:.0f} s")


def main(argv: list[str]) -> int:
    database_url = None
    if argv[:1] == ["--database-url"]:
        database_url, argv = argv[1], argv[2:]
    with tempfile.TemporaryDirectory(prefix="corral-fuzz-") as data:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env["CORRAL_LOG_LEVEL"] = "warning"
        if database_url:
            env["CORRAL_DATABASE_URL"] = database_url
        log_path = Path(data) / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen([str(BIN / "corral"), "serve", "--port", str(port), "--data-dir", data],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until_serving(base, server)
                status = subprocess.call([str(BIN / "schemathesis"), "run", f"{base}/openapi.json", "--workers", "1",
                                          "--checks", "not_a_server_error", "--request-timeout", "10", *argv],
                                         cwd=data)  # its .schemathesis/ notes stay out of the checkout
            finally:
                server.terminate()
                server.wait(timeout=30)
        log_text = log_path.read_text(errors="replace")
    if "Traceback" in log_text:
        print(f"the server logged a traceback while fuzzed:\n{log_text[-4000:]}", file=sys.stderr)
        return status or 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
