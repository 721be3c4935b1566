"""Server-Sent Events: a session's (or a run's) event log, resumable from any seq."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse

from corral.api.deps import KernelDep
from corral.errors import InvalidInput, NotFound
from corral.kernel import Kernel
from corral.store import repo
from corral.types import CancelMode

router = APIRouter(tags=["events"])


def _start_seq(after: int | None, last_event_id: str | None) -> int:
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise InvalidInput("Last-Event-ID must be an event seq (a non-negative integer)")
        return int(last_event_id)
    return after or 0


async def _frames(
    kernel: Kernel, session_id: str, after: int, run_id: str | None, cancel_on_disconnect: bool
) -> AsyncIterator[dict[str, Any]]:
    finished = False
    try:
        async for event in kernel.hub.observe(
            kernel.store, session_id, after=after, run_id=run_id, stop=kernel.stopping
        ):
            yield {"id": str(event.seq), "event": event.type, "data": json.dumps(event.payload())}
        finished = True
    finally:
        if cancel_on_disconnect and not finished and run_id is not None:
            kernel.cancel_soon(run_id, CancelMode.SOFT)


@router.get("/v1/sessions/{session_id}/events")
async def session_events(
    session_id: str,
    kernel: KernelDep,
    after: Annotated[int | None, Query(ge=0)] = None,
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
    after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    on_disconnect: Annotated[str, Query(pattern="^(continue|cancel)$")] = "continue",
) -> EventSourceResponse:
    async with kernel.store.read() as conn:
        row = await repo.get_run(conn, run_id)
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    start = _start_seq(after, last_event_id)
    frames = _frames(kernel, row.session_id, start, run_id, on_disconnect == "cancel")
    return EventSourceResponse(frames, ping=15)
