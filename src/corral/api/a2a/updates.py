"""A run's events as A2A stream events: status updates, and its text as artifact chunks.

A stream starts with the task as it was read (``tasks.task_of``), then follows the run's event
log from the seq that read saw: whatever committed later is sent, nothing twice. Token deltas
are chunks of the ``output`` artifact; a step that ends in tool calls is not the answer, so the
next step's first chunk replaces it (``append: false``), and the last chunk leaves the artifact
equal to the run's output, as ``tasks/get`` shows it. The stream ends with the run, or when the
run waits for a decision (``input-required``): the answer is a new message on the task.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

from a2a.types.a2a_pb2 import Part, TaskArtifactUpdateEvent, TaskStatusUpdateEvent

from corral.api.a2a.tasks import OUTPUT, Pending, TaskRecord, read_pending, task_status
from corral.events import Event
from corral.kernel import Kernel
from corral.types import EventType, RunStatus

Update = TaskStatusUpdateEvent | TaskArtifactUpdateEvent

# Events that move a task back to (or on in) ``working``; tool calls say which in the update's metadata.
_WORKING = frozenset({EventType.RUN_STARTED.value, EventType.APPROVAL_RESOLVED.value,
                      EventType.TOOL_STARTED.value, EventType.TOOL_COMPLETED.value})


class Updates:
    """Translates one run's events, in order, into the updates its client should see.

    ``shown`` is the artifact text the client already has; ``step`` the text of the model
    step being written. Events at or before the read the stream began with are ``absorb``-ed:
    they change what the step holds, but were already in that read.
    """

    def __init__(self, task_id: str, context_id: str, shown: str):
        self.task_id = task_id
        self.context_id = context_id
        self.shown = shown
        self.step = ""

    def __repr__(self) -> str:
        return f"<Updates {self.task_id} shown={len(self.shown)} step={len(self.step)}>"

    def absorb(self, event: Event) -> None:
        if event.type == EventType.MESSAGE_DELTA:
            self.step += event.data["text"]
        elif event.type == EventType.MESSAGE_COMPLETED and event.data.get("tool_calls"):
            self.step = ""

    def translate(self, event: Event) -> list[Update]:
        """What ``event`` shows the client (approval requests aside: see ``follow``)."""
        kind = event.type
        if kind == EventType.MESSAGE_DELTA:
            before = self.step
            self.absorb(event)
            return [self._chunk(event.data["text"], appended_to=before)]
        if kind == EventType.MESSAGE_COMPLETED:
            self.absorb(event)
            return []
        if kind == EventType.RUN_QUEUED:
            return [self._status(RunStatus.QUEUED, event)]
        if kind in _WORKING:
            detail: dict[str, Any] = {"event": kind}
            detail.update((k, event.data[k]) for k in ("call_id", "tool") if k in event.data)
            return [self._status(RunStatus.RUNNING, event, metadata=detail)]
        if event.is_terminal:
            status = RunStatus(event.data.get("status", RunStatus.FAILED.value))
            output = event.data.get("output")
            last = [self._last_chunk(output)] if output else []
            return [*last, self._status(status, event, error=event.data.get("error"))]
        return []

    def input_required(self, event: Event, pending: list[Pending]) -> Update:
        return self._status(RunStatus.WAITING, event, pending=pending)

    def _chunk(self, delta: str, appended_to: str) -> TaskArtifactUpdateEvent:
        if appended_to and self.shown == appended_to:
            self.shown = self.step
            return self._artifact(delta, append=True)
        # The client holds something else (an earlier step's text, or nothing of this step yet):
        # the step so far replaces it.
        self.shown = self.step
        return self._artifact(self.step, append=False)

    def _last_chunk(self, output: str) -> TaskArtifactUpdateEvent:
        if self.shown == output:
            return self._artifact("", append=True, last_chunk=True)
        self.shown = output
        return self._artifact(output, append=False, last_chunk=True)

    def _artifact(self, text: str, *, append: bool, last_chunk: bool = False) -> TaskArtifactUpdateEvent:
        event = TaskArtifactUpdateEvent(task_id=self.task_id, context_id=self.context_id, append=append,
                                        last_chunk=last_chunk)
        event.artifact.artifact_id = OUTPUT
        event.artifact.name = OUTPUT
        event.artifact.parts.append(Part(text=text))
        return event

    def _status(self, status: RunStatus, event: Event, *, pending: list[Pending] | None = None,
                error: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> TaskStatusUpdateEvent:
        update = TaskStatusUpdateEvent(task_id=self.task_id, context_id=self.context_id,
                                       status=task_status(self.task_id, self.context_id, status,
                                                          pending=pending or (), error=error, at=event.ts))
        if metadata:
            update.metadata.update(metadata)
        return update


async def follow(kernel: Kernel, record: TaskRecord) -> AsyncGenerator[Update]:
    """The updates of ``record``'s run after the read that made ``record``, until the run ends
    or waits for a decision; ends early, as every stream does, when the service stops."""
    artifact = record.run.output or ""
    updates = Updates(record.run_id, record.session_id, shown=artifact)
    events = run_events(kernel, record.session_id, record.run_id)
    async with aclosing(events):
        async for event in events:
            if event.seq <= record.last_seq:
                updates.absorb(event)
                continue
            if event.type == EventType.APPROVAL_REQUESTED:
                # Asked now, or answered already (a later event is on its way): the store says which.
                pending = await kernel.store.read(read_pending, record.run_id)
                if pending:
                    yield updates.input_required(event, pending)
                    return
                continue
            for update in updates.translate(event):
                yield update


def run_events(kernel: Kernel, session_id: str, run_id: str) -> AsyncGenerator[Event]:
    """The run's events from its first, ending after its terminal event (or as the service stops)."""
    events = kernel.hub.observe(kernel.store, session_id, run_id=run_id, stop=kernel.stopping)
    # An async generator, typed as an iterator: closed at once by whoever stops reading early.
    return cast("AsyncGenerator[Event]", events)
