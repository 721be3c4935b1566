"""``corral send``, ``corral runs`` and ``corral agents``: one request (or one run) each, for scripts.

Output that a script reads goes to stdout (JSON, or the streamed answer); everything a
person reads about a failure goes to stderr, and the exit status says how it went:
0 done, 1 an error (the server's or no server), 3 a run that did not complete.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from corral.cli.client import ClientError, CorralClient, Event
from corral.cli.render import agents_table, runs_table

EXIT_ERROR = 1
EXIT_RUN_NOT_COMPLETED = 3


def report_error(message: str) -> None:
    Console(stderr=True, highlight=False).print(Text.assemble(("error: ", "bold red"), (message, "red")),
                                                soft_wrap=True)


def call(url: str, token: str | None, work: Callable[[CorralClient], Awaitable[int]]) -> int:
    """Run one client command; a server or connection error becomes ``error: ...`` and exit 1."""

    async def main() -> int:
        async with CorralClient(url, token) as api:
            return await work(api)

    try:
        return asyncio.run(main())
    except ClientError as exc:
        report_error(str(exc))
        return EXIT_ERROR


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def _wait(api: CorralClient, run_id: str) -> int:
    """Stream the run's text to stdout until its terminal event (resuming across dropped connections)."""
    in_line = False
    last: Event | None = None

    def terminal(event: Event) -> bool:
        return event.is_terminal and event.run_id == run_id

    def dropped(problem: Exception | None) -> None:
        print(f"connection to {api.url} lost; reconnecting...", file=sys.stderr, flush=True)

    async for event in api.events(f"/v1/runs/{run_id}/events", until=terminal, on_drop=dropped):
        last = event
        if event.type == "message.delta":
            text = str(event.data.get("text", ""))
            sys.stdout.write(text)
            sys.stdout.flush()
            if text:
                in_line = not text.endswith("\n")
        elif event.type == "message.completed" and in_line:
            sys.stdout.write("\n")
            in_line = False
    if in_line:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if last is None or last.type == "run.completed":
        return 0
    error = last.data.get("error") or {}
    reason = error.get("message", "") if isinstance(error, dict) else str(error)
    report_error(f"run {run_id} {last.type.removeprefix('run.')}" + (f": {reason}" if reason else ""))
    return EXIT_RUN_NOT_COMPLETED


def send(url: str, token: str | None, session: str, text: str, mode: str, agent: str, wait: bool) -> int:
    async def work(api: CorralClient) -> int:
        target = await api.resolve_session(session, agent)
        accepted = await api.send(target["id"], text, mode)
        _print_json(accepted)
        return await _wait(api, accepted["run_id"]) if wait else 0

    return call(url, token, work)


def runs(url: str, token: str | None, session: str | None, statuses: list[str], limit: int, as_json: bool) -> int:
    async def work(api: CorralClient) -> int:
        found = await api.runs(session, statuses, limit)
        if as_json:
            _print_json(found)
        else:
            console = Console()
            console.print(runs_table(found, with_session=session is None, width=console.width))
        return 0

    return call(url, token, work)


def agents(url: str, token: str | None, as_json: bool) -> int:
    async def work(api: CorralClient) -> int:
        found = await api.agents()
        if as_json:
            _print_json(found)
        else:
            Console().print(agents_table(found))
        return 0

    return call(url, token, work)
