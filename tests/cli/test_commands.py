"""``corral send``, ``runs`` and ``agents`` as a script runs them: stdout, stderr and exit status."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cli import Server, corral_serve
from tests.helpers import CORRAL, clean_env, free_port

TOKEN = "s3cret-token-for-tests"
COMMAND_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with corral_serve(tmp_path_factory.mktemp("commands")) as server:
        yield server


def corral(server_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CORRAL), *args, "--url", server_url], env=clean_env(**env), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def key() -> str:
    return f"script-{uuid.uuid4().hex[:8]}"


def test_send_prints_the_accepted_message(server: Server) -> None:
    result = corral(server.base, "send", key(), "hello there")
    assert result.returncode == 0, result.stderr
    accepted = json.loads(result.stdout)
    assert accepted["disposition"] == "started"
    assert accepted["run_id"].startswith("run_") and accepted["session_id"].startswith("ses_")
    # The same session again, by id this time.
    again = corral(server.base, "send", accepted["session_id"], "and again", "--mode", "collect")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["session_id"] == accepted["session_id"]


def test_send_wait_streams_the_answer(server: Server) -> None:
    result = corral(server.base, "send", key(), "hello", "--wait")
    assert result.returncode == 0, result.stderr
    first, rest = result.stdout.split("\n", 1)
    assert json.loads(first)["disposition"] == "started"
    assert rest == "echo: hello\n"


def test_send_wait_on_a_failing_run_exits_non_zero(server: Server) -> None:
    result = corral(server.base, "send", key(), "/fail", "--wait")
    assert result.returncode == 3
    run_id = json.loads(result.stdout.splitlines()[0])["run_id"]
    assert f"error: run {run_id} failed: the demo model was told to fail" in result.stderr
    with server.http() as http:
        assert http.get(f"/v1/runs/{run_id}").json()["status"] == "failed"


def test_send_rejects_a_bad_mode_and_an_unknown_session(server: Server) -> None:
    bad_mode = corral(server.base, "send", key(), "x", "--mode", "sideways")
    assert bad_mode.returncode != 0 and "--mode" in bad_mode.stderr
    unknown = corral(server.base, "send", "ses_doesnotexist", "x")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "error: no session 'ses_doesnotexist'"
    assert unknown.stdout == ""


def test_runs_table_and_json(server: Server) -> None:
    ok = json.loads(corral(server.base, "send", key(), "hi", "--wait").stdout.splitlines()[0])
    failed = json.loads(corral(server.base, "send", key(), "/fail", "--wait").stdout.splitlines()[0])
    table = corral(server.base, "runs", "--status", "failed", "--status", "completed", COLUMNS="200")
    assert table.returncode == 0, table.stderr
    assert ok["run_id"] in table.stdout and failed["run_id"] in table.stdout
    as_json = corral(server.base, "runs", "--session", failed["session_id"], "--json")
    runs: list[dict[str, Any]] = json.loads(as_json.stdout)
    assert [(r["id"], r["status"]) for r in runs] == [(failed["run_id"], "failed")]
    only_failed = json.loads(corral(server.base, "runs", "--status", "failed", "--json").stdout)
    assert {r["status"] for r in only_failed} == {"failed"}


def test_agents_table_and_json(server: Server) -> None:
    table = corral(server.base, "agents")
    assert table.returncode == 0, table.stderr
    assert "assistant" in table.stdout and "ready" in table.stdout
    agents = json.loads(corral(server.base, "agents", "--json").stdout)
    assistant = next(a for a in agents if a["name"] == "assistant")
    assert assistant["state"] == "ready" and assistant["error"] is None


def test_jobs_add_list_rm(server: Server) -> None:
    added = corral(server.base, "jobs", "add", "water the plants", "--every", "3600")
    assert added.returncode == 0, added.stderr
    job = json.loads(added.stdout)
    assert job["schedule"] == {"every_s": 3600.0} and job["next_fire_at"] and job["session_id"] is None
    table = corral(server.base, "jobs", "list", COLUMNS="200")
    assert job["id"] in table.stdout and "every_s=3600.0" in table.stdout
    cron = json.loads(corral(server.base, "jobs", "add", "standup", "--cron", "0 9 * * 1-5", "--tz",
                             "Europe/Paris").stdout)
    assert cron["schedule"] == {"cron": "0 9 * * 1-5", "tz": "Europe/Paris"}
    listed = json.loads(corral(server.base, "jobs", "list", "--json").stdout)
    assert {j["id"] for j in listed} >= {job["id"], cron["id"]}
    assert corral(server.base, "jobs", "rm", job["id"]).returncode == 0
    assert job["id"] not in corral(server.base, "jobs", "list", "--json").stdout
    gone = corral(server.base, "jobs", "rm", job["id"])
    assert gone.returncode == 1 and gone.stderr.strip() == f"error: no job {job['id']!r}"
    both = corral(server.base, "jobs", "add", "x", "--every", "5", "--cron", "* * * * *")
    assert both.returncode == 2 and "exactly one of" in both.stderr
    bad_zone = corral(server.base, "jobs", "add", "x", "--cron", "0 9 * * *", "--tz", "Mars/Olympus")
    assert bad_zone.returncode == 1 and "time zone" in bad_zone.stderr
    corral(server.base, "jobs", "rm", cron["id"])


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with corral_serve(tmp_path_factory.mktemp("guarded"), CORRAL_API_TOKEN=TOKEN) as server:
        yield server


def test_token_is_sent_and_a_bad_one_is_a_clean_error(guarded: Server) -> None:
    missing = corral(guarded.base, "agents")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: a valid API token is required")
    wrong = corral(guarded.base, "agents", "--token", "not-the-token")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ")
    assert "not-the-token" not in wrong.stdout + wrong.stderr
    right = corral(guarded.base, "agents", "--token", TOKEN)
    assert right.returncode == 0 and "assistant" in right.stdout
    from_env = corral(guarded.base, "send", key(), "hi", "--wait", CORRAL_TOKEN=TOKEN)
    assert from_env.returncode == 0, from_env.stderr
    assert TOKEN not in from_env.stdout + from_env.stderr


def test_unreachable_server_is_a_clean_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["agents"], ["runs"], ["send", "k", "hi", "--wait"]):
        result = corral(url, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: cannot connect to the Corral server at {url}"), result.stderr
        assert "Traceback" not in result.stderr


def test_the_sessions_table_never_cuts_what_a_reader_copies() -> None:
    """On an 80-column terminal with a run active, the id, agent and key stay whole (/switch KEY)."""
    from rich.console import Console

    from corral.cli.render import sessions_table

    session = {"id": "ses_" + "a" * 20, "agent": "assistant", "key": "other-12345678",
               "created_at": "2026-12-03T08:55:51", "active_run_id": "run_" + "b" * 20, "queued": 3}
    console = Console(width=80, record=True)
    console.print(sessions_table([session], current=session["id"]))
    assert any(line.split()[:4] == ["*", session["id"], "assistant", "other-12345678"]
               for line in console.export_text().splitlines())
