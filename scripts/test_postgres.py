"""``make test``'s Postgres: runs a command (pytest) with ``CORRAL_TEST_PG`` naming a server that answers.

    .venv/bin/python scripts/test_postgres.py .venv/bin/pytest [ARGS...]

When the server ``CORRAL_TEST_PG`` names (``postgresql://postgres@127.0.0.1:5432/test`` by default)
lets its role into its database, the command runs on it. Otherwise this starts a throwaway one, the
way ``make browser`` gets chromium: Debian's ``postgresql`` (installed with apt when no server is),
a new cluster in a temporary directory owned by an unprivileged user (``postgres``, else ``nobody``),
superuser ``postgres`` with trust auth, on 127.0.0.1 at a free port with its socket in that
directory, and a database ``test``. It is stopped and removed when the command ends, however it
ends; the exit status is the command's.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def refusal(url: str) -> str | None:
    """None when ``url``'s role can open ``url``'s database, else why not."""

    async def connect() -> None:
        await (await asyncpg.connect(url, timeout=5)).close()

    try:
        asyncio.run(connect())
    except Exception as exc:  # refused, timed out, no such role or database, a password wanted...
        return f"{type(exc).__name__}: {exc}"
    return None


def server_bin() -> Path | None:
    """The directory of the newest installed server's ``initdb`` and ``pg_ctl``, if there is one."""

    def version(bin_dir: Path) -> list[int]:
        return [int(part) for part in bin_dir.parent.name.split(".") if part.isdigit()]

    debian = sorted((d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "pg_ctl").exists()), key=version)
    if debian:
        return debian[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def install_server() -> Path:
    print("test Postgres: installing Debian's postgresql with apt", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "postgresql"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    found = server_bin()
    if found is None:
        sys.exit("test Postgres: apt installed postgresql, yet there is no initdb under /usr/lib/postgresql")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def throwaway_server(bin_dir: Path) -> Iterator[str]:
    """A new cluster in a temporary directory, run as an unprivileged user; yields its ``test``
    database's URL, then stops the server and removes the directory."""
    root = Path(tempfile.mkdtemp(prefix="corral-test-pg-"))
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data, port = root / "data", free_port()

    def run(*argv: str | Path, check: bool = True) -> None:
        subprocess.run(argv, cwd=root, stdout=subprocess.DEVNULL, check=check, **as_user)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
            "--no-sync")
        log = root / "server.log"
        try:  # fsync off (-F): nothing here outlives the run
            run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60",
                "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
        except subprocess.CalledProcessError:
            sys.stderr.write(log.read_text() if log.exists() else "")
            raise
        try:
            run(bin_dir / "createdb", "-h", root, "-p", str(port), "-U", "postgres", "test")
            print(f"test Postgres: a throwaway server on 127.0.0.1:{port} in {root}", file=sys.stderr)
            yield f"postgresql://postgres@127.0.0.1:{port}/test"
        finally:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(command: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that the cleanup runs
    url = os.environ.get("CORRAL_TEST_PG", DEFAULT_URL)
    why = refusal(url)
    if why is None:
        return subprocess.run(command).returncode
    print(f"test Postgres: {url} does not answer ({why}); starting a throwaway one", file=sys.stderr)
    with throwaway_server(server_bin() or install_server()) as throwaway:
        try:
            return subprocess.run(command, env={**os.environ, "CORRAL_TEST_PG": throwaway}).returncode
        except KeyboardInterrupt:
            return 128 + signal.SIGINT


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
