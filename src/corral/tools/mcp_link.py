"""One MCP server of one agent: connect, list its tools, serve calls, restart it when it dies.

A link is driven by one task (``run``), started by the agent's ``McpSupervisor``. The task
owns the MCP client for its whole life: the SDK's client is built on anyio task groups, so
it must be entered and left by the same task. Tool calls come from run tasks and only
borrow the client while the link is ``up``; they never wait for a server that is not, so
a dead server costs a caller a clear error at once, not a hang.

Stopping is an anyio cancel scope, not ``Task.cancel()``: the SDK shuts a stdio server
down inside shielded scopes (close stdin, then terminate the process group), and only an
anyio cancellation is guaranteed to respect those shields and leave no process behind.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import httpx2
import mcp_types
from mcp import Client
from mcp.client import Transport
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from corral.errors import ToolError
from corral.specs import McpServerSpec
from corral.tools.mcp_status import STOPPED, McpState, McpStatus, McpTimings, McpToolInfo

log = logging.getLogger(__name__)

# The SDK imports jsonschema at the first call of a tool with an output schema: import it
# with this module, which loads in a worker thread (``mcp._link_module``), rather than block
# the event loop (every agent and session) then.
importlib.import_module("jsonschema")

CLIENT_INFO = mcp_types.Implementation(name="corral", version="1")
MAX_TOOL_PAGES = 100  # a server whose tools/list never stops paginating cannot hang the link
CLOSED = "the server closed the connection"


class _LinkError(Exception):
    """A failure the link describes itself; its message is shown as is."""


class McpLink:
    """The connection to one MCP server, restarted with capped exponential backoff."""

    def __init__(self, agent: str, spec: McpServerSpec, on_tools: Callable[[], None], timings: McpTimings):
        self.agent = agent
        self.spec = spec
        self.state = McpState.STARTING
        self.error: str | None = None
        self.restarts = 0
        self.tools: tuple[McpToolInfo, ...] = ()  # the last listing: kept while down, so calls get a clear error
        self._on_tools = on_tools
        self._timings = timings
        self._scope = anyio.CancelScope()  # cancelled by stop_nowait(), possibly before run() enters it
        self._stopped: str | None = None  # why it was stopped for good
        # Invariant: `_client` is set exactly while `state` is UP; `_ended` belongs to that same
        # session and is set once it is over (stream closed, or a call saw the connection drop).
        self._client: Client | None = None
        self._ended = anyio.Event()
        self._up_since = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<McpLink {self.agent}/{self.name} {self.state.value} tools={len(self.tools)} restarts={self.restarts}>"

    def status(self) -> McpStatus:
        names = tuple(f"{self.name}.{tool.name}" for tool in self.tools)
        return McpStatus(self.name, self.state, self.error, names, self.restarts)

    def stop_nowait(self, reason: str = STOPPED) -> None:
        """Stop for good: calls fail from now on; ``run()`` closes the connection and returns."""
        self._stopped = self._stopped or reason
        self._client = None
        self._set_down(reason)
        self._scope.cancel()

    # --- the link's own task ------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect after every failure, until ``stop_nowait()``."""
        delay = self._timings.backoff_min_s
        with self._scope:
            while True:
                self._up_since = math.inf
                try:
                    reason = await self._session()
                except Exception as exc:  # any failure of one session is the same thing: down, then restart
                    reason = self._describe(exc)
                if anyio.current_time() - self._up_since >= self._timings.healthy_s:
                    delay = self._timings.backoff_min_s
                self._set_down(reason)
                log.warning("MCP server %s of agent %s is down (%s); restarting in %.1f s",
                            self.name, self.agent, reason, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._timings.backoff_max_s)
                self.restarts += 1

    async def _session(self) -> str:
        """One connection, from spawn to its end; returns why it ended, or raises."""
        self.state = McpState.STARTING
        ended = anyio.Event()
        # A deadline for the start only: lifted once the server has listed its tools.
        with anyio.CancelScope(deadline=anyio.current_time() + self._timings.start_s) as starting:
            async with self._connect(ended) as client:
                listing = await _list_tools(client)
                starting.deadline = math.inf
                self._up(client, ended, listing)
                try:
                    await self._watch(client, ended)
                finally:
                    self._lose(client, CLOSED)
        if starting.cancelled_caught:
            raise _LinkError(f"no answer within {self._timings.start_s:g} s of starting")
        return self.error or CLOSED

    @asynccontextmanager
    async def _connect(self, ended: anyio.Event) -> AsyncIterator[Client]:
        async with AsyncExitStack() as stack:
            transport: Transport
            if self.spec.command is not None:
                command = self.spec.command
                params = StdioServerParameters(command=command[0], args=command[1:], env=self.spec.env or None,
                                               cwd=self.spec.cwd)
                transport = stdio_client(params)
            else:
                assert self.spec.url is not None  # the spec guarantees one transport
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=self.spec.headers, timeout=httpx2.Timeout(30.0, read=300.0)))
                transport = streamable_http_client(self.spec.url, http_client=http)
            client = Client(_EndWatch(transport, ended), cache=None, client_info=CLIENT_INFO)
            yield await stack.enter_async_context(client)

    async def _watch(self, client: Client, ended: anyio.Event) -> None:
        """Return when the session ends; meanwhile re-list the tools now and then."""
        while True:
            with anyio.move_on_after(self._timings.refresh_s):
                await ended.wait()
                return
            try:
                with anyio.fail_after(self._timings.start_s):
                    listing = await _list_tools(client)
            except TimeoutError:
                raise _LinkError(f"tools/list got no answer within {self._timings.start_s:g} s") from None
            self._publish(listing)

    # --- state changes: synchronous, so atomic on the event loop -----------------------

    def _up(self, client: Client, ended: anyio.Event, listing: tuple[McpToolInfo, ...]) -> None:
        self._client, self._ended = client, ended
        self.state, self.error = McpState.UP, None
        self._up_since = anyio.current_time()
        log.info("MCP server %s of agent %s is up with %d tools", self.name, self.agent, len(listing))
        self._publish(listing)

    def _publish(self, listing: tuple[McpToolInfo, ...]) -> None:
        if listing != self.tools:
            self.tools = listing
            self._on_tools()

    def _lose(self, client: Client, reason: str) -> None:
        """The session of ``client`` is over: later calls fail at once, and ``run()`` restarts."""
        if self._client is client:
            self._client = None
            self._set_down(reason)
            self._ended.set()

    def _set_down(self, reason: str) -> None:
        self.state = McpState.DOWN
        self.error = self._stopped or reason

    def _describe(self, exc: BaseException) -> str:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, BaseExceptionGroup):
            return "; ".join(self._describe(inner) for inner in exc.exceptions)
        if isinstance(exc, _LinkError):
            return str(exc)
        if isinstance(exc, MCPError) and exc.code == mcp_types.CONNECTION_CLOSED:
            if self.state is McpState.STARTING and self.spec.command is not None:
                return f"{CLOSED} while starting (did it exit? its stderr is in Corral's log)"
            return CLOSED
        if isinstance(exc, OSError) and self.state is McpState.STARTING and self.spec.command is not None:
            program, detail = self.spec.command[0], exc.strerror or str(exc)
            if exc.filename is not None and str(exc.filename) != program:  # e.g. a missing cwd
                detail = f"{detail}: {exc.filename}"
            return f"cannot run {program!r}: {detail}"
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    # --- calls, from run tasks -------------------------------------------------------

    def unavailable(self) -> str:
        if self._stopped:
            return f"MCP server {self.name} is {self.error}"
        if self.error is None:
            return f"MCP server {self.name} is still starting"
        return f"MCP server {self.name} is down (restarting): {self.error}"

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """Call ``tool`` on the server; a ``ToolError`` the model can read for every failure."""
        client = self._client
        if client is None:
            raise ToolError(self.unavailable())
        full = f"{self.name}.{tool}"
        timeout = self.spec.timeout_s
        try:
            # The SDK's own timeout cancels the request on the server too; the outer one is a
            # backstop for a server that stopped reading its input.
            with anyio.fail_after(timeout + 1.0):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._lose(client, "the connection closed during a call")
                raise ToolError(self.unavailable()) from exc
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(f"{full} timed out after {timeout:g} s") from exc
            raise ToolError(f"{full} failed: {exc}") from exc
        except TimeoutError as exc:
            raise ToolError(f"{full} timed out after {timeout:g} s") from exc
        except ValidationError as exc:
            raise ToolError(f"{full} returned a malformed result: {exc.errors(include_url=False)}") from exc
        text = _render(result)
        if result.is_error:
            raise ToolError(text or f"{full} reported an error")
        return text


async def _list_tools(client: Client) -> tuple[McpToolInfo, ...]:
    tools: list[McpToolInfo] = []
    cursor: str | None = None
    for _ in range(MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            schema = dict(tool.input_schema)
            schema.setdefault("type", "object")
            tools.append(McpToolInfo(tool.name, tool.description or tool.title or tool.name, schema))
        cursor = page.next_cursor
        if cursor is None:
            break
    return tuple(tools)


def _render(result: mcp_types.CallToolResult) -> str:
    """The result as the model reads it: text as is, other content named, structured data as JSON."""
    parts: list[str] = []
    for item in result.content:
        if isinstance(item, mcp_types.TextContent):
            parts.append(item.text)
        elif isinstance(item, mcp_types.ImageContent | mcp_types.AudioContent):
            parts.append(f"[{item.type}: {item.mime_type}]")
        elif isinstance(item, mcp_types.ResourceLink):
            parts.append(f"[resource link: {item.uri}]")
        elif isinstance(item, mcp_types.EmbeddedResource):
            resource = item.resource
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource: {resource.uri}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


class _EndWatch:
    """A transport whose read side reports its end: a stdio server that exits closes its
    stdout, and that is how the link learns of a crash at once rather than at the next call."""

    def __init__(self, inner: Transport, ended: anyio.Event):
        self._inner = inner
        self._ended = ended

    async def __aenter__(self) -> tuple[_ReadEndWatch, Any]:
        read, write = await self._inner.__aenter__()
        return _ReadEndWatch(read, self._ended), write

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._ended.set()
        return await self._inner.__aexit__(exc_type, exc, tb)


class _ReadEndWatch:
    """The SDK's read stream, passed through, setting ``ended`` when it ends."""

    def __init__(self, inner: Any, ended: anyio.Event):
        self._inner = inner
        self._ended = ended

    @property
    def last_context(self) -> Any:  # the dispatcher reads it from context-carrying streams
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._ended.set()
            raise
        return item

    def __aiter__(self) -> _ReadEndWatch:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._ended.set()
        await self._inner.aclose()

    async def __aenter__(self) -> _ReadEndWatch:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None
