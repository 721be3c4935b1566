"""The ``corral`` command."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral import __version__
from corral.errors import CorralError
from corral.types import Mode

if TYPE_CHECKING:
    from pydantic import ValidationError

app = typer.Typer(help="Corral: host many LLM agents and conversations at once.", no_args_is_help=True)

# The client commands share these; the token has no shown default so it never reaches a terminal.
Url = Annotated[str, typer.Option(envvar="CORRAL_URL", help="the Corral server")]
Token = Annotated[str | None, typer.Option(envvar="CORRAL_TOKEN", show_default=False,
                                           help="API token, sent as a Bearer token")]
DEFAULT_URL = "http://127.0.0.1:8787"
MODES = tuple(mode.value for mode in Mode)


def _mode(value: str) -> str:
    if value not in MODES:
        raise typer.BadParameter(f"one of {', '.join(MODES)}")
    return value


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind [default: 8787]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where the SQLite file lives [default: .corral]")] = None,
    config: Annotated[Path | None, typer.Option(help="a corral.toml file")] = None,
    database_url: Annotated[str | None, typer.Option(
        help="sqlite:///path/to/file.db, or postgresql+asyncpg://host/db [default: SQLite in the data dir]")] = None,
    advertise_url: Annotated[str | None, typer.Option(
        help="the URL other nodes reach this one at (Postgres) [default: http://HOST:PORT]")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="node processes on this machine sharing the port (Postgres only) [default: 1]")] = None,
) -> None:
    """Start the service (SQLite and the demo model unless configured otherwise)."""
    # What the server imports (here, not at the top: the client commands need none of it) is
    # some 200,000 objects that live as long as the process; while they load, the cyclic
    # collector would walk them over and over. It is off until they are loaded
    # (cli/serve.py, freeze_loaded_modules).
    gc.disable()
    from pydantic import ValidationError

    from corral.cli.workers import WORKER_ENV
    from corral.settings import load_settings

    try:
        if WORKER_ENV in os.environ:  # one of `--workers N`: the supervisor sends the settings (cli/workers.py)
            from corral.cli.workers import run_worker

            run_worker(os.environ.pop(WORKER_ENV))  # popped: not for the processes its tools start
            return
        settings = load_settings(config, host=host, port=port, data_dir=data_dir, database_url=database_url,
                                 advertise_url=advertise_url, workers=workers)
        from corral.cli.serve import serve as run_server  # after the settings: bad ones fail before it loads

        status = run_server(settings)
    except (CorralError, ValidationError, FileNotFoundError) as exc:
        from corral.cli.commands import report_error

        report_error(_settings_error(exc) if isinstance(exc, ValidationError) else str(exc))
        raise typer.Exit(2) from exc
    if status:
        raise typer.Exit(status)


def _settings_error(exc: ValidationError) -> str:
    """Pydantic's report as one line: each bad setting with its variable, and what is wrong."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if isinstance(cause, ValueError) else error["msg"]
        loc = ".".join(str(part) for part in error["loc"])
        name = f"{loc} (CORRAL_{str(error['loc'][0]).upper()})" if len(error["loc"]) == 1 else loc
        problems.append(f"{name}: {message}" if loc else message)
    return "invalid settings: " + "; ".join(problems)


@app.command()
def chat(
    agent: Annotated[str, typer.Argument(help="the agent to talk to")] = "assistant",
    session: Annotated[str | None, typer.Option(help="a session key (created on first use) or id (ses_...)")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Talk to an agent in the terminal: streamed answers, arrival modes, Ctrl-C stops a run."""
    from corral.cli.chat import run_chat

    raise typer.Exit(run_chat(url, token, agent, session))


@app.command()
def send(
    session: Annotated[str, typer.Argument(help="a session id (ses_...) or key (created on first use)")],
    text: Annotated[str, typer.Argument(help="the message")],
    mode: Annotated[str, typer.Option(callback=_mode, help="arrival mode: " + "|".join(MODES))] = "queue",
    agent: Annotated[str, typer.Option(help="the agent of a session created for a new key")] = "assistant",
    wait: Annotated[bool, typer.Option("--wait", help="stream the run's answer; exit 3 unless it completes")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Send one message and print the 202 answer as JSON (for scripts)."""
    from corral.cli import commands

    raise typer.Exit(commands.send(url, token, session, text, mode, agent, wait))


@app.command()
def runs(
    session: Annotated[str | None, typer.Option(help="only this session's runs")] = None,
    status: Annotated[list[str] | None, typer.Option(help="only runs in this status (repeatable)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List runs, newest first."""
    from corral.cli import commands

    raise typer.Exit(commands.runs(url, token, session, status or [], limit, as_json))


@app.command()
def agents(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List agents with their state and start-up error."""
    from corral.cli import commands

    raise typer.Exit(commands.agents(url, token, as_json))


jobs_app = typer.Typer(help="Scheduled jobs: messages sent to an agent on a schedule.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("add")
def jobs_add(
    message: Annotated[str, typer.Argument(help="what to send when the job fires")],
    agent: Annotated[str, typer.Option(help="the agent that answers")] = "assistant",
    session: Annotated[str | None, typer.Option(help="a session id; default: a fresh session per fire")] = None,
    cron: Annotated[str | None, typer.Option(help="a five-field cron expression, e.g. '0 9 * * 1-5'")] = None,
    tz: Annotated[str, typer.Option(help="the time zone of --cron")] = "UTC",
    every: Annotated[float | None, typer.Option(help="fire every this many seconds")] = None,
    at: Annotated[str | None, typer.Option(help="fire once at this ISO 8601 time with a zone")] = None,
    overlap: Annotated[str, typer.Option(help="skip or queue when the previous fire's run is still active")] = "skip",
    misfire: Annotated[str, typer.Option(help="after downtime: run_once or skip")] = "run_once",
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Add a job; prints it as JSON."""
    from corral.cli import jobs

    try:
        schedule = jobs.parse_schedule(cron, tz, every, at)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    body = {"agent": agent, "session_id": session, "schedule": schedule, "message": message,
            "overlap": overlap, "misfire": misfire}
    raise typer.Exit(jobs.add(url, token, body))


@jobs_app.command("list")
def jobs_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List your jobs with their next fire."""
    from corral.cli import jobs

    raise typer.Exit(jobs.list_jobs(url, token, as_json))


@jobs_app.command("rm")
def jobs_rm(job_id: str, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Delete a job: it fires no more."""
    from corral.cli import jobs

    raise typer.Exit(jobs.remove(url, token, job_id))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
