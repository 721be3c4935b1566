"""What ``corral serve`` refuses before it starts: a second process on one SQLite database,
``--workers`` > 1, a public bind on Postgres without the cluster secret, bad cluster settings.

The process tests start real ``corral serve`` processes on free loopback ports; the rest check
the settings, the checks and the lock in this process.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from corral.cli.serve import check_exposure, check_workers
from corral.errors import InvalidInput
from corral.settings import Settings, load_settings
from corral.single_process import DatabaseInUse, DatabaseLock, hold_database, sqlite_path
from tests.helpers import clean_env, client, corral_serve, free_port, new_http_session, post

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"  # never connected to: refused before the app starts
TOKEN = "admin-token-0123456789"
SECRET = "cluster-secret-0123456789"


async def refused_serve(*args: str, **env: str) -> str:
    """Run ``corral serve ARGS`` on a free loopback port; it must exit 2 at once. Its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral", "serve", "--port", str(free_port()), *args,
        env=clean_env(CORRAL_LOG_LEVEL="warning", **env), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:  # the caller's timeout: it started instead of refusing
            proc.kill()
            await proc.wait()
    message = stderr.decode()
    assert proc.returncode == 2, (proc.returncode, message, stdout.decode())
    assert message.startswith("error: ") and message.count("\n") == 1, message  # one line
    return message


# --- one process per SQLite database ---------------------------------------------------


async def test_a_second_serve_on_the_same_sqlite_database_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    database = (data / "corral.db").resolve()
    async with asyncio.timeout(90):
        async with corral_serve(data) as first, client(first.base) as http:
            sid = await new_http_session(http)
            # The same data directory, and the same file named by URL from elsewhere (another data dir).
            for args in (("--data-dir", str(data)),
                         ("--data-dir", str(tmp_path / "other"), "--database-url", f"sqlite:///{database}")):
                message = await refused_serve(*args)
                assert f"another Corral process (pid {first.proc.pid}) is serving the SQLite database {database}" \
                    in message, message
                assert f"{database}.lock" in message
            assert first.proc.returncode is None
            assert (await http.get("/healthz")).status_code == 200
            accepted = await post(http, sid, "still here")
            assert accepted["disposition"] == "started"
        assert (data / "corral.db.lock").read_text() == f"{first.proc.pid}\n"


async def test_after_kill_9_a_new_serve_starts_on_the_same_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with asyncio.timeout(90):
        async with corral_serve(data) as first:
            first.proc.kill()
            assert await first.proc.wait() == -signal.SIGKILL
        # The lock file is still there, naming the dead process; it holds nothing.
        assert (data / "corral.db.lock").read_text() == f"{first.proc.pid}\n"
        async with corral_serve(data) as second, client(second.base) as http:
            assert (await http.get("/healthz")).status_code == 200
            await post(http, await new_http_session(http), "after the crash")
            assert (data / "corral.db.lock").read_text() == f"{second.proc.pid}\n"


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    lock = hold_database(url)
    assert lock is not None
    with lock as held:
        assert held.held and held.path == tmp_path / "corral.db.lock"
        # Another open of the same file (here, the same process) is refused at once.
        with pytest.raises(DatabaseInUse, match=r"another Corral process \(pid \d+\) is serving"):
            hold_database(f"sqlite:///{tmp_path}/./corral.db")
    assert not held.held
    DatabaseLock(tmp_path / "corral.db").release()  # free again


def test_the_lock_holds_the_file_the_url_names_however_it_is_spelt(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = (tmp_path / "real" / "x.db").resolve()
    assert sqlite_path(f"sqlite:///{tmp_path}/link/x.db") == real
    assert sqlite_path(f"sqlite+aiosqlite:///{tmp_path}/real/x.db?timeout=3") == real
    assert sqlite_path(f"sqlite:///file:{tmp_path}/real/x.db?uri=true") == real
    assert sqlite_path(PG_URL) is None
    assert hold_database(PG_URL) is None  # several processes share Postgres by design


# --- --workers ---------------------------------------------------------------------------


async def test_workers_above_one_on_sqlite_exit_2(tmp_path: Path) -> None:
    async with asyncio.timeout(60):
        message = await refused_serve("--data-dir", str(tmp_path), "--workers", "2")
        assert "refusing 2 workers" in message and "one process only" in message, message
        # From the environment too.
        message = await refused_serve("--data-dir", str(tmp_path), CORRAL_WORKERS="3")
        assert "refusing 3 workers" in message, message
    assert not (tmp_path / "corral.db").exists()  # refused before anything was opened


def test_check_workers(tmp_path: Path) -> None:
    check_workers(Settings(data_dir=tmp_path))
    check_workers(Settings(data_dir=tmp_path, database_url=PG_URL))
    with pytest.raises(InvalidInput, match="one process only"):
        check_workers(Settings(data_dir=tmp_path, workers=2))
    check_workers(Settings(data_dir=tmp_path, database_url=PG_URL, workers=4))  # tests/cli/test_workers.py


# --- exposure on Postgres ----------------------------------------------------------------


def test_a_public_bind_on_postgres_requires_the_cluster_secret(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        public = {"data_dir": tmp_path, "host": host, "database_url": PG_URL, "api_token": TOKEN}
        with pytest.raises(InvalidInput, match="API token"):
            check_exposure(Settings(data_dir=tmp_path, host=host, database_url=PG_URL, cluster_secret=SECRET))
        with pytest.raises(InvalidInput, match="CORRAL_CLUSTER_SECRET"):
            check_exposure(Settings(**public))
        advertised = Settings(**public, cluster_secret=SECRET, advertise_url="http://10.0.0.5:8787")
        check_exposure(advertised)
        if host != "192.168.1.10":  # a wildcard address reaches nothing from another machine
            with pytest.raises(InvalidInput, match="CORRAL_ADVERTISE_URL"):
                check_exposure(Settings(**public, cluster_secret=SECRET))
        else:
            check_exposure(Settings(**public, cluster_secret=SECRET))
        # SQLite has no other nodes: the API token is enough.
        check_exposure(Settings(data_dir=tmp_path, host=host, api_token=TOKEN))
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(Settings(data_dir=tmp_path, host=host, database_url=PG_URL))


async def test_serve_refuses_a_public_bind_on_postgres_without_the_secret(tmp_path: Path) -> None:
    async with asyncio.timeout(60):
        message = await refused_serve("--host", "0.0.0.0", "--data-dir", str(tmp_path), "--database-url", PG_URL,
                                      CORRAL_API_TOKEN=TOKEN)
    assert "requires a cluster secret" in message and "CORRAL_CLUSTER_SECRET" in message, message
    assert TOKEN not in message


# --- the cluster settings ----------------------------------------------------------------


def test_cluster_settings_defaults_and_derived_values(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert (settings.advertise_url, settings.cluster_secret, settings.lease_ttl_s, settings.heartbeat_s,
            settings.workers) == (None, None, 10.0, 2.0, 1)
    assert settings.resolved_advertise_url() == "http://127.0.0.1:8787"
    assert settings.database_backend == "sqlite" and not settings.is_postgres
    assert Settings(data_dir=tmp_path, host="::1", port=9000).resolved_advertise_url() == "http://[::1]:9000"
    assert Settings(advertise_url="https://node-a.internal:443/").resolved_advertise_url() == \
        "https://node-a.internal:443"
    postgres = Settings(database_url=PG_URL)
    assert postgres.database_backend == "postgresql" and postgres.is_postgres


def test_cluster_settings_come_from_flags_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    for name in ("ADVERTISE_URL", "CLUSTER_SECRET", "LEASE_TTL_S", "HEARTBEAT_S", "WORKERS", "CONFIG"):
        monkeypatch.delenv(f"CORRAL_{name}", raising=False)
    toml = tmp_path / "corral.toml"
    toml.write_text('lease_ttl_s = 30\nheartbeat_s = 5\ncluster_secret = "from-the-file-0123456789"\n')
    monkeypatch.setenv("CORRAL_ADVERTISE_URL", "http://10.0.0.7:8787")
    monkeypatch.setenv("CORRAL_WORKERS", "3")
    monkeypatch.setenv("CORRAL_HEARTBEAT_S", "4")
    settings = load_settings(toml, workers=None, advertise_url="http://10.0.0.8:9000")
    assert settings.resolved_advertise_url() == "http://10.0.0.8:9000"  # the flag beats the environment
    assert (settings.workers, settings.lease_ttl_s, settings.heartbeat_s) == (3, 30.0, 4.0)
    assert settings.cluster_secret is not None
    assert settings.cluster_secret.get_secret_value() == "from-the-file-0123456789"


def test_cluster_secret_never_shows(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, cluster_secret=SECRET)
    assert isinstance(settings.cluster_secret, SecretStr)
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in shown
    with pytest.raises(ValidationError) as refused:
        Settings(cluster_secret="short-secret")
    assert "at least 16 characters" in str(refused.value) and "short-secret" not in str(refused.value)


@pytest.mark.parametrize(("values", "complaint"), [
    ({"lease_ttl_s": 0}, "greater than 0"),
    ({"lease_ttl_s": -1}, "greater than 0"),
    ({"heartbeat_s": 5.0}, "heartbeat_s (CORRAL_HEARTBEAT_S) is 5 s but must be less than half of lease_ttl_s"),
    ({"lease_ttl_s": 3.0}, "less than half of lease_ttl_s (CORRAL_LEASE_TTL_S, 3 s)"),
    ({"heartbeat_s": 0}, "greater than 0"),
    ({"workers": 0}, "greater than or equal to 1"),
    ({"advertise_url": "node-a:8787"}, "must be an http:// or https:// URL with a host"),
    ({"advertise_url": "http://"}, "must be an http:// or https:// URL with a host"),
])
def test_bad_cluster_settings_are_refused(tmp_path: Path, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, **values)
    assert complaint in str(refused.value)
    Settings(data_dir=tmp_path, lease_ttl_s=3.0, heartbeat_s=1.4)  # strictly below half is fine


async def test_serve_reports_a_bad_setting_on_one_line_with_its_variable(tmp_path: Path) -> None:
    async with asyncio.timeout(60):
        message = await refused_serve("--data-dir", str(tmp_path), CORRAL_HEARTBEAT_S="5")
    assert message == ("error: invalid settings: heartbeat_s (CORRAL_HEARTBEAT_S) is 5 s but must be less than "
                       "half of lease_ttl_s (CORRAL_LEASE_TTL_S, 10 s), so that one late heartbeat does not "
                       "cost a live node its lease\n")
