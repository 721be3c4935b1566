"""Server-Sent Events: a session's (or a run's) event log, resumable from any seq."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep, PrincipalDep, owned_run, owned_session
from corral.api.json_body import CheckedRoute
from corral.api.schemas import MAX_INT64
from corral.errors import InvalidInput
from corral.kernel import Kernel
from corral.kernel.observers import PAGE
from corral.store import Event, repo
from corral.types import CancelMode, RunStatus

router = APIRouter(tags=["events"], route_class=CheckedRoute)


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
    instead of one per event (a turn commits its events in two or three groups).

    Framed here rather than by sse-starlette's ``ServerSentEvent``, which splits its data into
    lines and checks each field, some 8% of the event loop's time under load: an event's
    type is one of ours and its JSON is one line (``json.dumps`` escapes line breaks), so the
    frame is three fixed lines. The bytes are the same.
    """
    return b"".join(
        f"id: {e.seq}\r\nevent: {e.type}\r\ndata: {e.payload_json()}\r\n\r\n".encode() for e in events
    )


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


@router.get("/v1/sessions/{session_id}/events")
async def session_events(
    session_id: str,
    kernel: KernelDep,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    await owned_session(kernel, principal, session_id)
    start = _start_seq(after, last_event_id)
    return EventSourceResponse(_frames(kernel, session_id, start, None, False), ping=15)


@router.get("/v1/runs/{run_id}/events")
async def run_events(
    run_id: str,
    kernel: KernelDep,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    on_disconnect: Annotated[str, Query(pattern="^(continue|cancel)$")] = "continue",
) -> EventSourceResponse:
    row = await owned_run(kernel, principal, run_id)
    start = _start_seq(after, last_event_id)
    # An ended run's stream is its replay, even resumed past the terminal event (which would otherwise
    # wait for a live event that never comes).
    ended = RunStatus(row.status).is_terminal
    frames = _frames(kernel, row.session_id, start, run_id, on_disconnect == "cancel", ended)
    return EventSourceResponse(frames, ping=15)


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
