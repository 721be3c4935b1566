"""Server-Sent Events: a session's (or a run's) event log, resumable from any seq.

Under uvicorn over HTTP/1.1 a stream is written straight to its connection as events commit
(``corral.api.stream``); anything else gets the same frames and resume rules through
sse-starlette's response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep, PrincipalDep, held_run, owned_run, owned_session
from corral.api.json_body import CheckedRoute
from corral.api.schemas import MAX_INT64
from corral.api.stream import EventStream, connection_transport
from corral.errors import InvalidInput, NotFound
from corral.kernel import Accepted, Kernel
from corral.kernel.observers import PAGE
from corral.principals import Principal
from corral.store import Event, repo
from corral.types import CancelMode, Disposition, RunStatus

router = APIRouter(tags=["events"], route_class=CheckedRoute)
# Accepts a message as ``POST .../messages`` does (the caller's checks and arguments bound in).
Submit = Callable[[], Awaitable[Accepted]]


def _start_seq(after: int | None, last_event_id: str | None) -> int:
    if last_event_id is not None:
        if not last_event_id.strip().isdigit() or int(last_event_id) > MAX_INT64:
            raise InvalidInput("Last-Event-ID must be an event seq (a non-negative 64-bit integer)")
        return int(last_event_id)
    return after or 0


async def _replay(kernel: Kernel, session_id: str, after: int, run_id: str) -> AsyncIterator[list[Event]]:
    """An ended run's stored events after ``after``; ends even when that is past its terminal event."""
    while True:
        page = await kernel.store.read(repo.events_after, session_id, after, run_id=run_id, limit=PAGE)
        if page:
            after = page[-1].seq
            yield list(page)
        if len(page) < PAGE:
            return


def _encode(events: list[Event]) -> bytes:
    """Events ready together as one chunk: one write through the middlewares and the socket
    instead of one per event (``Event.sse_frame``: the bytes sse-starlette would write)."""
    return b"".join(event.sse_frame() for event in events)


async def _frames(
    kernel: Kernel, session_id: str, after: int, run_id: str | None, cancel_on_disconnect: bool,
    ended: bool = False,
) -> AsyncIterator[bytes]:
    finished = False
    if ended and run_id is not None:
        batches = _replay(kernel, session_id, after, run_id)
    else:
        batches = kernel.hub.observe_batches(kernel.store, session_id, after=after, run_id=run_id,
                                             stop=kernel.stopping)
    try:
        async for batch in batches:
            yield _encode(batch)
        finished = True
    finally:
        if cancel_on_disconnect and not finished and run_id is not None:
            kernel.cancel_soon(run_id, CancelMode.SOFT)


def _stream(request: Request, kernel: Kernel, session_id: str, after: int, run_id: str | None = None,
            cancel_on_disconnect: bool = False, ended: bool = False) -> Response:
    transport = connection_transport(request.scope)
    if transport is None:
        return EventSourceResponse(_frames(kernel, session_id, after, run_id, cancel_on_disconnect, ended), ping=15)
    return EventStream(kernel, transport, session_id, after=after, run_id=run_id, ended=ended,
                       cancel_on_disconnect=cancel_on_disconnect)


@router.get("/v1/sessions/{session_id}/events", response_class=EventSourceResponse)
async def session_events(
    session_id: str,
    request: Request,
    kernel: KernelDep,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    await owned_session(kernel, principal, session_id)
    return _stream(request, kernel, session_id, _start_seq(after, last_event_id))


async def _run_of(kernel: Kernel, principal: Principal, run_id: str) -> tuple[str, bool]:
    """The run's session and whether it has ended; an unfinished run of a session held here
    answers from memory (a run's stream follows every turn of a client that uses one)."""
    held = held_run(kernel, run_id)
    if held is not None:
        session_id, owner = held
        if not principal.may_access(owner):
            raise NotFound(f"no run {run_id!r}")
        return session_id, False
    row = await owned_run(kernel, principal, run_id)
    return row.session_id, RunStatus(row.status).is_terminal


@router.get("/v1/runs/{run_id}/events", response_class=EventSourceResponse)
async def run_events(
    run_id: str,
    request: Request,
    kernel: KernelDep,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    on_disconnect: Annotated[str, Query(pattern="^(continue|cancel)$")] = "continue",
) -> Response:
    session_id, ended = await _run_of(kernel, principal, run_id)
    # An ended run's stream is its replay, even resumed past the terminal event (which would otherwise
    # wait for a live event that never comes).
    return _stream(request, kernel, session_id, _start_seq(after, last_event_id), run_id, on_disconnect == "cancel",
                   ended)


@router.get("/v1/feed")
async def feed(kernel: KernelDep, principal: PrincipalDep) -> EventSourceResponse:
    """Every event but token deltas, across the caller's sessions, plus ``session.created``.

    Not resumable (sessions have separate seqs): the first frame, ``ready``, comes once
    the feed is attached, and after it, or after a ``resync``, a client reads current
    state from ``GET /v1/sessions``; from then on the feed keeps it current.
    """

    def accepts(session_id: str) -> bool:
        live = kernel.sessions.live(session_id)
        return principal.admin or (live is not None and live.owner == principal.name)

    async def frames() -> AsyncIterator[dict[str, Any]]:
        notices = kernel.hub.open_feed(accepts)
        try:
            yield {"event": "ready", "data": json.dumps({"principal": principal.name})}
            while (notice := await notices.get(kernel.stopping)) is not None:
                kind, data = notice
                yield {"event": kind, "data": json.dumps(data)}
        finally:
            kernel.hub.close_feed(notices)

    return EventSourceResponse(frames(), ping=15)


# --- one request: a message and its run's events -----------------------------------------


def wants_stream(request: Request) -> bool:
    """``POST .../messages`` answers with the run's events: ``Accept: text/event-stream`` (and
    not JSON first) or ``?stream=true``."""
    if request.query_params.get("stream", "").lower() in ("true", "1"):
        return True
    accept = request.headers.get("accept", "")
    return "text/event-stream" in accept and "application/json" not in accept


async def answer_with_stream(request: Request, kernel: Kernel, session_id: str, submit: Submit) -> Response:
    """Accept a message (``submit``, as the 202 path does: same checks, same errors before any
    byte of the stream) and answer 200 with its run's events, the frames and resume rules of
    ``GET /v1/runs/{id}/events``: ``Last-Event-ID`` or ``?after=`` skip what the client has.
    The run is named in ``x-corral-run-id`` (with ``x-corral-input-id`` and
    ``x-corral-disposition``), so a client cut off can resume with that ``GET``.

    The stream joins the session's audience before the input is submitted: a run created by it
    (``started`` or ``queued``, not a repeated ``Idempotency-Key``) has every event come through
    the hub, and the stream reads nothing from the store.
    """
    start = _start_seq(_after_param(request), request.headers.get("last-event-id"))
    cancel_on_disconnect = request.query_params.get("on_disconnect") == "cancel"
    transport = connection_transport(request.scope)
    stream = None
    if transport is not None:
        stream = EventStream(kernel, transport, session_id, after=start, cancel_on_disconnect=cancel_on_disconnect)
        stream.open()
    try:
        accepted = await submit()
    except BaseException:
        if stream is not None:
            stream.close()
        raise
    headers = {"x-corral-session-id": accepted.session_id, "x-corral-run-id": accepted.run_id,
               "x-corral-input-id": accepted.input_id, "x-corral-disposition": accepted.disposition.value}
    if stream is None:
        frames = _frames(kernel, session_id, start, accepted.run_id, cancel_on_disconnect)
        return EventSourceResponse(frames, ping=15, headers=headers)
    new_run = accepted.disposition in (Disposition.STARTED, Disposition.QUEUED) and not accepted.duplicate
    stream.follow(accepted.run_id, new_run=new_run, headers=headers)
    return stream


def _after_param(request: Request) -> int | None:
    raw = request.query_params.get("after")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) > MAX_INT64:
        raise InvalidInput("after must be an event seq (a non-negative 64-bit integer)")
    return int(raw)
