"""``corral chat``: an interactive terminal client over the HTTP API.

Three things happen at once on one event loop: the session's event stream is rendered as it
arrives, lines typed on stdin are posted in order, and Ctrl-C stops the active run (soft,
then hard). None may wait on another: a slow POST must not freeze the stream, and a long
run must not stop the user from steering it or stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from rich.console import Console
from rich.text import Text

from corral.cli.client import MODES, ApiError, ClientError, CorralClient, Event, Session
from corral.cli.render import EventView, Screen, sessions_table, summarise

HELP = """\
Lines are sent to the agent with the current mode. Commands:
  /mode queue|steer|collect|interrupt|rollback|reject   how the next lines arrive at a busy session
  /sessions              list sessions            /switch KEY_OR_ID   follow another session
  /new                   start a fresh session    /stop               stop the active run (soft)
  /approve [CALL_ID]     approve pending calls    /deny [CALL_ID]     deny pending calls
  /help                  this text                /quit (or Ctrl-D)   leave (runs go on)
Ctrl-C stops the active run: first softly, a second time at once. At idle, Ctrl-C twice leaves.
Other lines starting with / (such as the demo model's /steps) are sent as they are; // sends a literal /."""

COMMANDS = frozenset({"/mode", "/sessions", "/switch", "/new", "/stop", "/approve", "/deny", "/help", "/quit",
                      "/exit"})
RECAP_MESSAGES = 4


class StdinLines:
    """Lines typed on stdin, without blocking the loop and without touching its file flags.

    ``add_reader`` on fd 0 leaves the tty in line mode (so the terminal provides basic
    editing and Ctrl-C still raises SIGINT) and never sets O_NONBLOCK on a descriptor
    shared with stdout. Files cannot be polled, so those are read by a daemon thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]):
        self._loop, self._queue, self._buffer = loop, queue, b""
        self._fd = sys.stdin.fileno()
        try:
            loop.add_reader(self._fd, self._readable)
            self._polled = True
        except (PermissionError, ValueError, OSError):
            self._polled = False
            threading.Thread(target=self._read_blocking, daemon=True, name="corral-stdin").start()

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            if self._buffer:
                self._queue.put_nowait(self._buffer.decode(errors="replace"))
            self._buffer = b""
            self._queue.put_nowait(None)
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._queue.put_nowait(line.decode(errors="replace").rstrip("\r"))

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._fd)
        self._feed(chunk)

    def _read_blocking(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            try:
                self._loop.call_soon_threadsafe(self._feed, chunk)
            except RuntimeError:
                return  # the chat is over and its loop closed
            if not chunk:
                return

    def close(self) -> None:
        if self._polled:
            self._loop.remove_reader(self._fd)


class Chat:
    """The state a terminal needs about its session: the mode, the active run, pending approvals."""

    def __init__(self, api: CorralClient, agent: str, console: Console):
        self.api, self.agent = api, agent
        self.screen = Screen(console)
        self.view = EventView(self.screen)
        self.mode = "queue"
        self.session: Session | None = None
        self.active_run: str | None = None
        self.ended: set[str] = set()  # runs whose terminal event was seen: never "active" again
        self.pending: dict[str, str] = {}  # call id -> run id, approvals waiting for a decision
        self.soft_stopped: str | None = None  # the run a soft stop was sent to (a second Ctrl-C is hard)
        self.idle_interrupts = 0
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._follower: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- the main loop -----------------------------------------------------------------

    async def run(self, session_key: str | None) -> int:
        try:
            session = await (self.api.resolve_session(session_key, self.agent) if session_key
                             else self.api.open_session(self.agent))
            await self.follow(session)
        except ClientError as exc:
            self.screen.error(str(exc))
            return 1
        loop = asyncio.get_running_loop()
        stdin = StdinLines(loop, self.lines)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            self.screen.info("/help lists commands; Ctrl-D or /quit leaves")
            while True:
                self.screen.prompt(self.mode)
                line = await self.lines.get()
                if line is None:
                    break
                self.screen.input_taken()
                if not await self.handle(line):
                    break
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            stdin.close()
            await self._stop_following()
            for task in list(self._tasks):
                task.cancel()
            self.screen.end_line()
        return 0

    async def handle(self, line: str) -> bool:
        """One line from the user; False ends the chat."""
        self.idle_interrupts = 0
        text = line.strip()
        if not text:
            return True
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        try:
            if command not in COMMANDS:
                await self.send(text[1:] if text.startswith("//") else line)
            elif command in ("/quit", "/exit"):
                return False
            elif command == "/help":
                self.screen.line(HELP, "dim")
            elif command == "/mode":
                self.set_mode(arg)
            elif command == "/sessions":
                sessions = await self.api.sessions()
                self.screen.table(sessions_table(sessions, self.session["id"] if self.session else None))
            elif command == "/switch":
                if not arg:
                    self.screen.error("usage: /switch KEY_OR_ID")
                else:
                    await self.follow(await self.api.resolve_session(arg, self.agent))
            elif command == "/new":
                await self.follow(await self.api.open_session(self.agent))
            elif command == "/stop":
                if self.active_run is None:
                    self.screen.info("no run is active")
                else:
                    self.soft_stopped = self.active_run  # so that Ctrl-C now stops it hard
                    await self.cancel(self.active_run, "soft")
            else:
                await self.decide("approve" if command == "/approve" else "deny", arg or None)
        except ClientError as exc:  # the server's JSON error, or no answer: the chat goes on
            self.screen.error(str(exc))
        return True

    def set_mode(self, mode: str) -> None:
        if not mode:
            self.screen.info(f"mode: {self.mode}")
        elif mode not in MODES:
            self.screen.error(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        else:
            self.mode = mode

    async def send(self, content: str) -> None:
        if self.session is None:
            return
        accepted = await self.api.send(self.session["id"], content, self.mode)
        run_id, disposition = accepted["run_id"], accepted["disposition"]
        if disposition == "started" and run_id not in self.ended:
            self._activate(run_id)  # its run.started may still be on the wire: Ctrl-C must know it now
        elif disposition == "queued":
            self.screen.line(f"  queued as {run_id}, after the active run", "dim")
        elif disposition == "collected":
            self.screen.line(f"  collected into {run_id}", "dim")

    # --- following a session -----------------------------------------------------------

    async def follow(self, session: Session) -> None:
        """Follow ``session`` from now on: what already happened is summarised, not replayed."""
        after = await self.api.last_seq(session["id"])
        await self._stop_following()
        self.session, self.agent = session, session["agent"]
        self.active_run, self.soft_stopped = None, None
        self.pending.clear()
        if session["active_run_id"]:
            self._activate(session["active_run_id"])
        key = f" (key {session['key']})" if session["key"] else ""
        self.screen.info(f"session {session['id']}{key}, agent {session['agent']}")
        await self._recap(session["id"])
        self._follower = asyncio.create_task(self._follow(session["id"], after), name="corral-follow")

    async def _recap(self, session_id: str) -> None:
        messages = [m for m in await self.api.messages(session_id)
                    if m["role"] in ("user", "assistant") and m["content"] and not m["rolled_back"]]
        for message in messages[-RECAP_MESSAGES:]:
            who = "you" if message["role"] == "user" else self.agent
            self.screen.line(Text(f"  {who}: {summarise(message['content'])}", style="dim"))

    async def _follow(self, session_id: str, after: int) -> None:
        try:
            async for event in self.api.events(
                f"/v1/sessions/{session_id}/events", after=after,
                on_drop=lambda exc: self.screen.line("  connection lost; reconnecting...", "dim yellow"),
                on_resume=lambda: self.screen.line("  reconnected", "dim"),
            ):
                self.observe(event)
                self.view.show(event)
                if not self.screen.in_line:
                    self.screen.prompt(self.mode)
        except (ClientError, ValueError) as exc:  # ValueError: a frame that is not JSON
            self.screen.error(f"stopped following {session_id}: {exc}")

    def observe(self, event: Event) -> None:
        run_id = event.run_id
        if run_id is None:
            return
        if event.type == "run.started" and run_id not in self.ended:
            self._activate(run_id)
        elif event.type == "approval.requested":
            self.pending[str(event.data.get("call_id"))] = run_id
        elif event.type == "approval.resolved":
            self.pending.pop(str(event.data.get("call_id")), None)
        elif event.is_terminal:
            self.ended.add(run_id)
            self.pending = {call: run for call, run in self.pending.items() if run != run_id}
            if self.active_run == run_id:
                self.active_run = None

    def _activate(self, run_id: str) -> None:
        if self.active_run != run_id:
            self.active_run, self.idle_interrupts = run_id, 0

    async def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None

    # --- stopping runs and deciding approvals ------------------------------------------

    def interrupt(self) -> None:
        """Ctrl-C: stop the active run (soft, then hard); at idle, a hint, and a second press leaves."""
        run_id = self.active_run
        if run_id is None:
            self.idle_interrupts += 1
            if self.idle_interrupts >= 2:
                self.lines.put_nowait(None)
            else:
                self.screen.info("no run is active; Ctrl-D or /quit leaves (or Ctrl-C again)")
                self.screen.prompt(self.mode)
            return
        mode = "hard" if self.soft_stopped == run_id else "soft"
        self.soft_stopped = run_id
        self._spawn(self.cancel(run_id, mode))

    async def cancel(self, run_id: str, mode: str) -> None:
        hint = "; Ctrl-C again stops it at once" if mode == "soft" else ""
        self.screen.info(f"stopping {run_id} ({mode}){hint}")
        try:
            await self.api.cancel(run_id, mode)
        except ApiError as exc:
            if exc.status != 409:  # 409: it ended meanwhile, which is what was wanted
                self.screen.error(str(exc))
        except ClientError as exc:
            self.screen.error(str(exc))
        self.screen.prompt(self.mode)

    async def decide(self, decision: str, call_id: str | None) -> None:
        if call_id is not None:
            run_id = self.pending.get(call_id) or self.active_run
            if run_id is None:
                self.screen.error(f"no pending approval {call_id!r} is known")
                return
            targets = {call_id: run_id}
        else:
            targets = dict(self.pending)
        if not targets:
            self.screen.info("no approval is pending")
        for call, run_id in targets.items():
            await self.api.decide(run_id, call, decision)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def run_chat(url: str, token: str | None, agent: str, session_key: str | None) -> int:
    async def main() -> int:
        async with CorralClient(url, token) as api:
            return await Chat(api, agent, Console(highlight=False)).run(session_key)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C before the chat's own handler was installed
        return 130
