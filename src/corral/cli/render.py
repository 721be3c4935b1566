"""How the terminal client shows things: streamed text, event notices, a prompt, and tables.

Kept apart from the chat's control flow so that what a user sees can change without touching
how input, signals and streams are juggled, and so ``corral runs``/``agents`` share the tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from corral.cli.client import Agent, Event, Run, Session

CLEAR_LINE = "\r\x1b[K"
SUMMARY_CHARS = 100

STATUS_STYLE = {
    "completed": "green", "failed": "red", "cancelled": "yellow", "interrupted": "yellow",
    "running": "cyan", "waiting": "magenta", "queued": "dim", "ready": "green", "starting": "cyan",
}


def summarise(value: Any, limit: int = SUMMARY_CHARS) -> str:
    """One line, at most ``limit`` characters: tool arguments and results can be huge or multi-line."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Screen:
    """The chat's output: streamed text and whole lines, with the prompt kept on the last line.

    Streamed deltas leave the cursor mid-line; any whole line printed then first ends that
    line. The prompt is drawn only when nothing is mid-line and is wiped before other output,
    so a reply never lands after ``queue> `` (on a terminal; a pipe gets no prompt at all).
    """

    def __init__(self, console: Console):
        self.console = console
        self.in_line = False
        self.prompt_visible = False

    @property
    def tty(self) -> bool:
        return self.console.is_terminal

    def _clear_prompt(self) -> None:
        if self.prompt_visible:
            self.console.file.write(CLEAR_LINE)
            self.prompt_visible = False

    def stream(self, text: str) -> None:
        if not text:
            return
        self._clear_prompt()
        self.console.out(text, end="", highlight=False)
        self.console.file.flush()
        self.in_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.in_line:
            self.console.out("")
            self.in_line = False

    def line(self, text: Text | str, style: str = "") -> None:
        self._clear_prompt()
        self.end_line()
        line = text if isinstance(text, Text) else Text(text, style=style)
        self.console.print(line, soft_wrap=True, highlight=False)

    def table(self, table: Table) -> None:
        self._clear_prompt()
        self.end_line()
        self.console.print(table)

    def error(self, message: str) -> None:
        self.line(Text.assemble(("error: ", "bold red"), (message, "red")))

    def info(self, message: str) -> None:
        self.line(message, "cyan")

    def prompt(self, mode: str) -> None:
        if not self.tty or self.in_line or self.prompt_visible:
            return
        self.console.print(Text(f"{mode}> ", style="bold"), end="", soft_wrap=True, highlight=False)
        self.console.file.flush()
        self.prompt_visible = True

    def input_taken(self) -> None:
        """The user pressed Enter: the terminal's echo moved the cursor past the prompt."""
        self.prompt_visible = False


class EventView:
    """Turns session events into screen output; remembers only what a line break depends on."""

    def __init__(self, screen: Screen):
        self.screen = screen
        self._streamed = False  # text shown since the last message.completed

    def show(self, event: Event) -> None:
        data, kind, screen = event.data, event.type, self.screen
        if kind == "message.delta":
            text = str(data.get("text", ""))
            self._streamed = self._streamed or bool(text)
            screen.stream(text)
        elif kind == "message.completed":
            content = str(data.get("content") or "")
            if not self._streamed and content:
                screen.stream(content)  # text that arrived without deltas (none were seen)
            screen.end_line()
            self._streamed = False
        elif kind == "tool.started":
            screen.line(Text(f"  > {data.get('tool')} {summarise(data.get('arguments', {}))}", style="dim"))
        elif kind == "tool.completed":
            style = "red dim" if data.get("is_error") else "dim"
            screen.line(Text(f"  < {data.get('tool')}: {summarise(data.get('result', ''))}", style=style))
        elif kind == "run.steered":
            screen.line(Text.assemble(("  steered: ", "yellow"), (str(data.get("content", "")), "")))
        elif kind == "approval.requested":
            screen.line(Text.assemble(
                ("approval needed: ", "bold magenta"),
                (f"{data.get('tool')} {summarise(data.get('arguments', {}))} (call {data.get('call_id')}); ", ""),
                ("type /approve or /deny", "magenta"),
            ))
        elif kind == "approval.resolved":
            screen.line(Text(f"  approval {data.get('call_id')}: {data.get('decision', data.get('status', ''))}",
                             style="dim"))
        elif kind == "input.requeued":
            screen.line(Text(f"  your message moved to run {data.get('run_id')} (run {data.get('from_run_id')} "
                             "ended before taking it)", style="dim"))
        elif kind in ("run.failed", "run.cancelled", "run.interrupted"):
            self._streamed = False
            verb = kind.removeprefix("run.")
            error = data.get("error") or {}
            reason = error.get("message") if isinstance(error, dict) else error
            style = "bold red" if kind == "run.failed" else "bold yellow"
            screen.line(Text(f"run {verb}" + (f": {reason}" if reason else ""), style=style))
        elif kind == "run.completed":
            self._streamed = False
            screen.end_line()


def _when(value: str | None) -> str:
    return (value or "").replace("T", " ")[:19]


def _status(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


def sessions_table(sessions: Sequence[Session], current: str | None = None) -> Table:
    # Ids, agents and keys are what a reader copies (/switch KEY): on a narrow terminal the rest wraps.
    table = Table("", Column("id", no_wrap=True), Column("agent", no_wrap=True), Column("key", no_wrap=True), "created",
                  "active run", "queued", box=None, header_style="bold")
    for s in sessions:
        table.add_row("*" if s["id"] == current else "", s["id"], s["agent"], s.get("key") or "",
                      _when(s.get("created_at")), s.get("active_run_id") or "", str(s.get("queued", 0)))
    return table


def _duration(run: Run) -> str:
    start, end = run.get("started_at"), run.get("ended_at")
    if not start or not end:
        return ""
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{seconds:.2f}s" if seconds < 100 else f"{seconds:.0f}s"


def runs_table(runs: Sequence[Run], *, with_session: bool = True, width: int = 120) -> Table:
    """Ids are never cut (they are what a reader copies): the output column gives way, then the session."""
    headers = ["run", "session", "status", "created", "took"]
    rows: list[tuple[list[str], str]] = []
    for run in runs:
        error = run.get("error")
        detail = (error.get("message", "") if isinstance(error, dict) else "") if error else run.get("output") or ""
        cells = [run["id"], run["session_id"], run["status"], _when(run.get("created_at"))[5:], _duration(run)]
        rows.append((cells, detail))
    widths = [max([len(h)] + [len(cells[i]) for cells, _ in rows]) + 2 for i, h in enumerate(headers)]
    if sum(widths) + 16 > width:
        with_session = False  # too narrow for both ids
    shown = [i for i in range(len(headers)) if with_session or headers[i] != "session"]
    room = max(12, width - sum(widths[i] for i in shown) - 2)
    table = Table(*(headers[i] for i in shown), "output / error", box=None, header_style="bold")
    for cells, detail in rows:
        table.add_row(*(_status(cells[i]) if headers[i] == "status" else cells[i] for i in shown),
                      summarise(detail, room))
    return table


def agents_table(agents: Sequence[Agent]) -> Table:
    table = Table("name", "provider", "model", "state", "tools", "mcp servers", "error", box=None,
                  header_style="bold")
    for agent in agents:
        servers = ", ".join(f"{s.get('name')}: {s.get('state')}" for s in agent.get("mcp_servers") or [])
        provider = "acp (external)" if agent.get("driver") == "acp" else agent["provider"]
        table.add_row(agent["name"], provider, agent.get("model") or "", _status(agent["state"]),
                      ", ".join(agent.get("tools") or []), servers, agent.get("error") or "")
    return table
