"""One running ACP agent program: its process group, its connection, and its sessions.

An ACP (Agent Client Protocol) agent is a program that runs its own model and tools and
talks JSON-RPC over stdio. Corral is its client: it sends prompts, receives
``session/update`` notifications, and answers ``session/request_permission``.

Why not the SDK's ``spawn_agent_process``: it pipes the agent's stderr and never reads it
(a chatty agent then blocks on a full pipe), and it leaves the child to asyncio's child
watcher, which on Python 3.11 can lose an exit. Here the program is started with
``subprocess.Popen`` in a process group of its own (:class:`~corral.childproc.ChildProcess`),
its stderr is read line by line into Corral's log, and only the SDK's connection is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from acp import (
    PROTOCOL_VERSION,
    Client,
    RequestError,
    RequestPermissionResponse,
    connect_to_agent,
    default_environment,
    text_block,
)
from acp.core import DEFAULT_STDIO_BUFFER_LIMIT_BYTES, ClientSideConnection
from acp.schema import ClientCapabilities, DeniedOutcome, Implementation, PermissionOption, ToolCallUpdate

from corral import __version__
from corral.childproc import ChildProcess
from corral.errors import ExternalAgentError
from corral.specs import AcpSpec

log = logging.getLogger("corral.acp")

# A line of the agent's stderr longer than this is cut in the log.
MAX_LOG_LINE = 4000
# How long a program whose connection dropped gets to exit before its code is reported unknown.
EXIT_WAIT_S = 2.0


def describe(exc: BaseException) -> str:
    """An error answer's message with its details: "Internal error" alone says nothing."""
    data = exc.data if isinstance(exc, RequestError) else None
    if isinstance(data, dict) and set(data) == {"details"}:
        data = data["details"]
    return f"{exc} ({data})" if data else str(exc) or type(exc).__name__


class SessionSink(Protocol):
    """Whoever is prompting an ACP session right now (a run): it gets the session's updates."""

    def on_update(self, update: Any) -> None: ...

    async def on_permission(
        self, tool_call: ToolCallUpdate, options: list[PermissionOption]
    ) -> RequestPermissionResponse: ...


CANCELLED = RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))


class _Client:
    """The client side of the protocol, as the SDK calls it: routes each message to the run
    that is prompting the session it names. We advertise no file system or terminal
    capability, so the SDK answers those methods "not found" on its own."""

    def __init__(self, owner: AcpProcess):
        self._owner = owner

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        sink = self._owner.sinks.get(session_id)
        if sink is not None:
            sink.on_update(update)

    async def request_permission(
        self, session_id: str, tool_call: ToolCallUpdate, options: list[PermissionOption], **kwargs: Any
    ) -> RequestPermissionResponse:
        sink = self._owner.sinks.get(session_id)
        if sink is None:  # nobody is prompting this session: nobody could approve
            return CANCELLED
        return await sink.on_permission(tool_call, options)


class AcpProcess:
    """Start with :meth:`start`, stop with :meth:`aclose`; :meth:`kill` for a hard cancel.

    ``on_exit`` is told when the program exits on its own or is killed, but not when
    :meth:`aclose` stops it: the agent manager decides what an exit means.
    """

    def __init__(self, name: str, spec: AcpSpec, workspace: Path, on_exit: Callable[[AcpProcess], None]):
        self.name = name
        self.spec = spec
        self.workspace = workspace
        self._on_exit = on_exit
        self.child: ChildProcess | None = None
        self.conn: ClientSideConnection | None = None
        # Corral session id -> ACP session id, and ACP session id -> the run prompting it.
        self.sessions: dict[str, str] = {}
        self.sinks: dict[str, SessionSink] = {}
        # The session `start` opened to prove the agent works; the first Corral session takes it.
        self._spare: str | None = None
        self.killed = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._transports: list[asyncio.BaseTransport] = []

    def __repr__(self) -> str:
        return f"<AcpProcess {self.name} {self.child!r} sessions={len(self.sessions)}>"

    @property
    def exit_code(self) -> int | None:
        return self.child.code if self.child is not None else None

    async def start(self) -> None:
        """Spawn the program, then ``initialize`` and ``session/new``: the agent is ready after both."""
        await asyncio.to_thread(self.workspace.mkdir, parents=True, exist_ok=True)
        env = {**default_environment(), **self.spec.env}
        try:
            # Popen's fork and exec take about a millisecond: not worth a thread hop.
            process = subprocess.Popen(  # noqa: ASYNC220
                self.spec.command, cwd=self.workspace, env=env, start_new_session=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise ExternalAgentError(f"cannot start {self.spec.command[0]!r}: {exc.strerror or exc}") from None
        self.child = ChildProcess(process)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._pump_stderr(process.stderr), name=f"acp-stderr:{self.name}"))
        self._tasks.append(loop.create_task(self._watch_exit(), name=f"acp-exit:{self.name}"))

        reader = asyncio.StreamReader(limit=DEFAULT_STDIO_BUFFER_LIMIT_BYTES)
        stdout, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stdout)
        self._transports.append(stdout)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, process.stdin)
        self._transports.append(transport)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        # The SDK takes a partial client: what it lacks, it answers "method not found".
        self.conn = connect_to_agent(cast(Client, _Client(self)), writer, reader)
        try:
            async with asyncio.timeout(self.spec.startup_timeout_s):
                await self.conn.initialize(
                    protocol_version=PROTOCOL_VERSION, client_capabilities=ClientCapabilities(),
                    client_info=Implementation(name="corral", version=__version__),
                )
                self._spare = (await self.conn.new_session(cwd=str(self.workspace), mcp_servers=[])).session_id
        except TimeoutError:
            raise ExternalAgentError(
                f"the ACP agent did not answer initialize and session/new within {self.spec.startup_timeout_s:g} s"
            ) from None
        except ConnectionError:
            raise ExternalAgentError(f"the ACP agent exited during start (code {await self._exit_code()}); "
                                     "its stderr is in Corral's log (logger corral.acp)") from None
        except Exception as exc:  # an error answer (RequestError) or a malformed one
            raise ExternalAgentError(f"the ACP agent failed to start: {describe(exc)}") from None

    async def session_for(self, corral_session_id: str) -> str:
        """The ACP session that holds this Corral session's conversation (opened on first use)."""
        known = self.sessions.get(corral_session_id)
        if known is not None:
            return known
        if self._spare is not None:
            acp_session, self._spare = self._spare, None
        else:
            try:
                acp_session = (await self._connection().new_session(cwd=str(self.workspace), mcp_servers=[])).session_id
            except Exception as exc:
                raise await self.failure(exc) from None
        # Two runs of one session never overlap (the lane), so nobody raced us for the entry.
        self.sessions[corral_session_id] = acp_session
        return acp_session

    def _connection(self) -> ClientSideConnection:
        if self.conn is None or self._closing or (self.child is not None and self.child.exited):
            raise ExternalAgentError(f"the ACP agent {self.name!r} is not running")
        return self.conn

    async def failure(self, exc: BaseException) -> ExternalAgentError:
        """What a failed request means for the run that made it."""
        if isinstance(exc, ExternalAgentError):
            return exc
        if self._closing:
            return ExternalAgentError("the ACP agent was stopped (deleted, restarted or shut down) during the prompt")
        if isinstance(exc, ConnectionError) or (self.child is not None and self.child.exited):
            how = "was killed" if self.killed else f"exited (code {await self._exit_code()})"
            return ExternalAgentError(f"the ACP agent process {how} during the prompt")
        return ExternalAgentError(f"the ACP agent answered with an error: {describe(exc)}")

    async def _exit_code(self) -> str:
        """The code of a program whose pipes just closed: it exits about now, so wait a little.
        (Never ``Popen.poll()``: reaping the leader early would free its group id for reuse.)"""
        if self.child is None:
            return "unknown"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_WAIT_S):
                await self.child.wait_exited()
        return str(self.child.reap()) if self.child.exited else "unknown: still running"

    async def prompt(self, acp_session: str, text: str) -> Any:
        return await self._connection().prompt(session_id=acp_session, prompt=[text_block(text)])

    async def cancel(self, acp_session: str) -> None:
        """``session/cancel`` is a notification: the caller must bound the wait for its effect."""
        with contextlib.suppress(ConnectionError, ExternalAgentError):
            await self._connection().cancel(session_id=acp_session)

    def kill(self) -> None:
        """A hard cancel: the whole process group goes now. ``on_exit`` is told at once, so no
        new prompt is sent to a program that is as good as gone."""
        if self.killed or self.child is None or self.child.exited:
            return
        self.killed = True
        self.child.signal_group(signal.SIGKILL)
        if not self._closing:
            self._on_exit(self)

    async def aclose(self) -> None:
        """Stop the program and everything it started, and wait until they are gone."""
        self._closing = True
        if self.conn is not None:
            await self.conn.close()  # fails what is still waiting for an answer
        for transport in self._transports:
            transport.close()  # EOF on its stdin: a well-behaved agent exits on that
        if self.child is not None:
            await self.child.end(at_once=False)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self.child is not None:  # the pipes no transport took (a start cancelled early)
            process = self.child.process
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()

    async def _watch_exit(self) -> None:
        assert self.child is not None
        await self.child.wait_exited()
        self.child.reap()  # and whatever it left running in its group
        if self.conn is not None:
            await self.conn.close()
        if not self._closing and not self.killed:  # a kill told on_exit already
            log.warning("ACP agent %s exited with code %s", self.name, self.child.code)
            self._on_exit(self)

    async def _pump_stderr(self, pipe: Any) -> None:
        """Read the agent's stderr to its end, a line at a time, into Corral's log."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line beyond the reader's limit (the reader dropped it)
                    log.info("[%s] (a line of more than 1 MiB, not logged)", self.name)
                    continue
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                if len(text) > MAX_LOG_LINE:
                    text = text[:MAX_LOG_LINE] + f" [... {len(text) - MAX_LOG_LINE} more characters]"
                log.info("[%s] %s", self.name, text)
        finally:
            transport.close()
