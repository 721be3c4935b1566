"""Server-Sent Events: a session's (or a run's) event log, resumable from any seq."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep
from corral.api.schemas import MAX_INT64
from corral.errors import InvalidInput, NotFound
from corral.kernel import Kernel
from corral.kernel.observers import PAGE
from corral.store import Event, repo
from corral.types import CancelMode, RunStatus

router = APIRouter(tags=["events"])


def _start_seq(after: int | None, last_event_id: str | None) -> int:
    if last_event_id is not None:
        if not last_event_id.strip().isdigit() or int(last_event_id) > MAX_INT64:
            raise InvalidInput("Last-Event-ID must be an event seq (a non-negative 64-bit integer)")
        return int(last_event_id)
    return after or 0


async def _replay(kernel: Kernel, session_id: str, after: int, run_id: str) -> AsyncIterator[Event]:
    """An ended run's stored events after ``after``; ends even when that is past its terminal event."""
    while True:
        async with kernel.store.read() as conn:
            page = await repo.events_after(conn, session_id, after, run_id=run_id, limit=PAGE)
        for event in page:
            after = event.seq
            yield event
        if len(page) < PAGE:
            return


async def _frames(
    kernel: Kernel, session_id: str, after: int, run_id: str | None, cancel_on_disconnect: bool,
    ended: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    finished = False
    if ended and run_id is not None:
        events = _replay(kernel, session_id, after, run_id)
    else:
        events = kernel.hub.observe(kernel.store, session_id, after=after, run_id=run_id, stop=kernel.stopping)
    try:
        async for event in events:
            yield {"id": str(event.seq), "event": event.type, "data": json.dumps(event.payload())}
        finished = True
    finally:
        if cancel_on_disconnect and not finished and run_id is not None:
            kernel.cancel_soon(run_id, CancelMode.SOFT)


@router.get("/v1/sessions/{session_id}/events")
async def session_events(
    session_id: str,
    kernel: KernelDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    async with kernel.store.read() as conn:
        if await repo.get_session(conn, session_id) is None:
            raise NotFound(f"no session {session_id!r}")
    start = _start_seq(after, last_event_id)
    return EventSourceResponse(_frames(kernel, session_id, start, None, False), ping=15)


@router.get("/v1/runs/{run_id}/events")
async def run_events(
    run_id: str,
    kernel: KernelDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT64)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    on_disconnect: Annotated[str, Query(pattern="^(continue|cancel)$")] = "continue",
) -> EventSourceResponse:
    async with kernel.store.read() as conn:
        row = await repo.get_run(conn, run_id)
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    start = _start_seq(after, last_event_id)
    # An ended run's stream is its replay, even resumed past the terminal event (which would otherwise
    # wait for a live event that never comes).
    ended = RunStatus(row.status).is_terminal
    frames = _frames(kernel, row.session_id, start, run_id, on_disconnect == "cancel", ended)
    return EventSourceResponse(frames, ping=15)
