"""Observers get what is ready at once as one batch (a stream writes it as one chunk)."""

from __future__ import annotations

import asyncio

from corral.kernel import Kernel
from corral.store import Event, NewEvent
from corral.types import EventType
from tests.helpers import new_session


async def test_events_committed_together_arrive_as_one_batch(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        batches = kernel.hub.observe_batches(kernel.store, session)
        first = asyncio.ensure_future(anext(batches))
        await kernel.store.write(None, [NewEvent(session, EventType.MESSAGE_DELTA, "run_x", {"text": t})
                                        for t in ("a", "b", "c")])
        batch = await first
        assert [e.data["text"] for e in batch] == ["a", "b", "c"]
        assert [e.seq for e in batch] == [1, 2, 3]
        await batches.aclose()


async def test_a_run_stream_ends_at_the_terminal_event_inside_a_batch(kernel: Kernel) -> None:
    async with asyncio.timeout(10):
        session = await new_session(kernel)
        events = [NewEvent(session, EventType.MESSAGE_DELTA, "run_x", {"text": "hi"}),
                  NewEvent(session, EventType.RUN_COMPLETED, "run_x", {"status": "completed"}),
                  NewEvent(session, EventType.RUN_QUEUED, "run_y", {}),
                  NewEvent(session, EventType.MESSAGE_DELTA, "run_x", {"text": "after the end"})]
        got: list[list[Event]] = []
        reader = asyncio.ensure_future(_collect(kernel, session, "run_x", got))
        await kernel.store.write(None, events)
        await reader
        assert [[e.type for e in batch] for batch in got] == [["message.delta", "run.completed"]]
        # The same from the store, for a reader that comes late: the backlog is batched alike.
        late: list[list[Event]] = []
        await _collect(kernel, session, "run_x", late)
        assert [[e.type for e in batch] for batch in late] == [["message.delta", "run.completed"]]


async def _collect(kernel: Kernel, session: str, run_id: str, into: list[list[Event]]) -> None:
    async for batch in kernel.hub.observe_batches(kernel.store, session, run_id=run_id):
        into.append(list(batch))
