"""A small async client for Corral's HTTP API, shared by ``corral chat``, ``send``, ``runs`` and ``agents``.

It speaks only HTTP (never the kernel or the store), so the terminal client works against any
Corral server, local or remote, exactly as a third-party client would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NotRequired, TypedDict, cast

import httpx
from httpx_sse import SSEError, aconnect_sse

from corral.errors import CorralError
from corral.types import Mode

DEFAULT_URL = "http://127.0.0.1:8787"
TERMINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled", "run.interrupted"})
MODES = tuple(mode.value for mode in Mode)

# The server pings an idle stream every 15 s; three missed pings mean a dead connection to replace.
STREAM_READ_TIMEOUT_S = 45.0
RECONNECT_MAX_DELAY_S = 2.0


class ClientError(CorralError):
    """Anything that stops a client command: the caller prints ``message`` and exits non-zero."""

    code = "client_error"


class ApiError(ClientError):
    """The server answered with its JSON error body (``{"error": {"code", "message"}}``)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Unreachable(ClientError):
    """No HTTP answer at all: the server is down, the URL is wrong, or the connection broke."""

    code = "unreachable"


class Session(TypedDict):
    id: str
    agent: str
    key: str | None
    created_at: str
    active_run_id: str | None
    queued: int


class Accepted(TypedDict):
    input_id: str
    run_id: str
    session_id: str
    disposition: str


class Run(TypedDict):
    id: str
    session_id: str
    status: str
    output: str | None
    error: dict[str, Any] | None
    created_at: str
    started_at: str | None
    ended_at: str | None


class McpServer(TypedDict):
    name: str
    state: str
    error: str | None
    tools: list[str]


class Agent(TypedDict):
    name: str
    driver: NotRequired[str]
    provider: str
    model: str | None
    state: str
    error: str | None
    generation: int
    tools: list[str]
    mcp_servers: NotRequired[list[McpServer]]


class Message(TypedDict):
    run_id: str
    role: str
    content: str
    rolled_back: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE frame: ``seq`` is the session's gap-free event number (the SSE ``id:``)."""

    seq: int
    type: str
    data: dict[str, Any]

    @property
    def run_id(self) -> str | None:
        value = self.data.get("run_id")
        return value if isinstance(value, str) else None

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
        error = body["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class CorralClient:
    """One connection pool to one server; use as ``async with CorralClient(url, token) as api``."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> CorralClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        if isinstance(exc, httpx.ConnectError):
            return Unreachable(f"cannot connect to the Corral server at {self.url} ({exc or 'connection refused'})")
        return Unreachable(f"the request to {self.url} failed: {type(exc).__name__} {exc}".rstrip())

    async def request(self, method: str, path: str, *, body: Any = None, params: Any = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json() if response.content else None

    # --- the API, one method per endpoint the CLI uses -----------------------------------

    async def agents(self) -> list[Agent]:
        return cast(list[Agent], await self.request("GET", "/v1/agents"))

    async def open_session(self, agent: str, key: str | None = None) -> Session:
        """Create a session, or get the one that already has ``key`` (the server dedupes by key)."""
        body: dict[str, Any] = {"agent": agent}
        if key is not None:
            body["key"] = key
        return cast(Session, await self.request("POST", "/v1/sessions", body=body))

    async def session(self, session_id: str) -> Session:
        return cast(Session, await self.request("GET", f"/v1/sessions/{session_id}"))

    async def resolve_session(self, key_or_id: str, agent: str) -> Session:
        """``ses_...`` names an existing session; anything else is a key (created on first use)."""
        if key_or_id.startswith("ses_"):
            return await self.session(key_or_id)
        return await self.open_session(agent, key_or_id)

    async def sessions(self, agent: str | None = None, limit: int = 20) -> list[Session]:
        params: dict[str, Any] = {"limit": limit}
        if agent:
            params["agent"] = agent
        return cast(list[Session], await self.request("GET", "/v1/sessions", params=params))

    async def messages(self, session_id: str) -> list[Message]:
        return cast(list[Message], await self.request("GET", f"/v1/sessions/{session_id}/messages"))

    async def send(self, session_id: str, content: str, mode: str = "queue") -> Accepted:
        body = {"content": content, "mode": mode}
        return cast(Accepted, await self.request("POST", f"/v1/sessions/{session_id}/messages", body=body))

    async def runs(self, session_id: str | None = None, statuses: list[str] | None = None,
                   limit: int = 100) -> list[Run]:
        params: list[tuple[str, str | int]] = [("limit", limit)]
        if session_id:
            params.append(("session_id", session_id))
        params += [("status", status) for status in statuses or []]
        return cast(list[Run], (await self.request("GET", "/v1/runs", params=params))["runs"])

    async def run(self, run_id: str) -> Run:
        return cast(Run, await self.request("GET", f"/v1/runs/{run_id}"))

    async def cancel(self, run_id: str, mode: str = "soft") -> dict[str, Any]:
        return cast(dict[str, Any], await self.request("POST", f"/v1/runs/{run_id}/cancel", body={"mode": mode}))

    async def decide(self, run_id: str, call_id: str, decision: str) -> None:
        await self.request("POST", f"/v1/runs/{run_id}/approvals/{call_id}", body={"decision": decision})

    async def last_seq(self, session_id: str) -> int:
        """The seq of the newest ended run's terminal event: where "now" starts for a new follower.

        The API has no "latest seq" field, but an ended run's stream replays its events and
        ends, and its last frame is its terminal event. Events of runs still active are newer,
        so a follower starting here sees them (including the active run's partial output).
        """
        ended = await self.runs(session_id, ["completed", "failed", "cancelled", "interrupted"], limit=1)
        if not ended:
            return 0
        last = 0
        async for event in self.events(f"/v1/runs/{ended[0]['id']}/events", reconnect=False):
            last = event.seq
        return last

    # --- Server-Sent Events ----------------------------------------------------------------

    async def events(
        self,
        path: str,
        *,
        after: int | None = None,
        until: Callable[[Event], bool] | None = None,
        reconnect: bool = True,
        on_drop: Callable[[Exception | None], None] | None = None,
        on_resume: Callable[[], None] | None = None,
    ) -> AsyncIterator[Event]:
        """Events after ``after`` until ``until(event)`` is true, surviving dropped connections.

        Each reconnection sends ``Last-Event-ID`` with the last seq received, and the server
        replays from there with no gap and no duplicate: streamed text is never repeated.
        A stream the server ends before ``until`` holds (a restart, a shutdown) is resumed the
        same way. With ``reconnect=False`` the iteration ends with the stream (a replay) and
        a broken connection raises instead.
        """
        last = after
        delay = 0.1
        dropped = False
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT_S)
            problem: Exception | None = None
            try:
                async with aconnect_sse(self._http, "GET", path, headers=headers, timeout=timeout) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        error = _error_from(source.response)
                        if source.response.status_code < 500 or not reconnect:
                            raise error
                        raise _Retry(error)  # e.g. 503 while the server restarts
                    if dropped and on_resume is not None:
                        on_resume()
                    dropped = False
                    async for frame in source.aiter_sse():
                        if not frame.id.isdigit():
                            continue  # not one of Corral's events
                        data = json.loads(frame.data) if frame.data else {}
                        event = Event(int(frame.id), frame.event, data if isinstance(data, dict) else {})
                        last, delay = event.seq, 0.1  # only a stream that delivers resets the back-off
                        yield event
                        if until is not None and until(event):
                            return
                if not reconnect:
                    return
            except _Retry as exc:
                problem = exc.error
            except (httpx.TransportError, SSEError) as exc:
                if not reconnect:
                    if isinstance(exc, httpx.TransportError):
                        raise self._unreachable(exc) from exc
                    raise ClientError(f"{self.url}{path} is not an event stream: {exc}") from exc
                problem = exc
            if not dropped and on_drop is not None:
                on_drop(problem)
            dropped = True
            await asyncio.sleep(delay)  # a back-off between attempts, not a wait for a condition
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)


class _Retry(Exception):
    """A server-side (5xx) answer to a stream request: worth another attempt."""

    def __init__(self, error: ApiError):
        super().__init__(str(error))
        self.error = error
