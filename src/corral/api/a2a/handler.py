"""The A2A request handler over the kernel: a context is a session, a task is a run.

The SDK's own handler runs an ``AgentExecutor`` in a task registry of its own and keeps task
snapshots in a ``TaskStore``; Corral's runs already are durable tasks with an ordered event
log, so this handler reads and drives them directly and the SDK keeps only what it is good
at: JSON-RPC (1.0 and 0.3), validation, and Server-Sent Events. A task is the run, visible
through ``/v1/runs`` too, and ``tasks/get`` finds it after a restart.

Each call acts for the caller's principal on the agent the path names; a context or task of
another principal, or of another agent, is not found (as on ``/v1``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.events import Event as A2AEvent
from a2a.server.request_handlers import RequestHandler, validate_request_params
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.errors import (
    A2AError,
    ExtendedAgentCardNotConfiguredError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.task import apply_history_length, validate_history_length
from google.protobuf.json_format import MessageToDict

from corral import errors
from corral.api.a2a.inbound import content_of, decisions_of
from corral.api.a2a.tasks import TaskRecord, read_record, task_of
from corral.api.a2a.updates import follow, run_events
from corral.kernel import Kernel
from corral.principals import Principal
from corral.store import repo
from corral.types import CancelMode, Mode

# How long tasks/cancel waits for the run to end before answering with the task as it is
# (a soft cancel waits for the run's next boundary; ``{"mode": "hard"}`` stops it at once).
CANCEL_WAIT_S = 5.0
# An A2A message id becomes the input's Idempotency-Key: a client's retry is the same input.
MAX_KEY = 200


@dataclass(frozen=True)
class Caller:
    """Who calls, for which agent: put in the call context by the route (``server.py``)."""

    kernel: Kernel
    principal: Principal
    agent: str


def caller_of(context: ServerCallContext) -> Caller:
    caller = context.state["corral"]
    assert isinstance(caller, Caller)
    return caller


class CorralRequestHandler(RequestHandler):
    """A2A's operations on Corral's sessions and runs (docs/a2a.md has the mapping)."""

    def __repr__(self) -> str:
        return "<CorralRequestHandler>"

    # --- messages ---------------------------------------------------------------------

    @validate_request_params
    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Task | Message:
        """The task once its run has ended or waits for a decision (at once with
        ``returnImmediately``, 0.3's ``blocking: false``)."""
        caller = caller_of(context)
        with _translated():
            validate_history_length(params.configuration)
            run_id = await _accept(caller, params.message)
            if not params.configuration.return_immediately:
                async with aclosing(self._updates(caller, run_id)) as updates:
                    async for _ in updates:
                        pass
            task = task_of(await _record(caller, run_id))
        return apply_history_length(task, params.configuration)

    @validate_request_params
    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext) -> AsyncGenerator[A2AEvent]:
        """The task, then its run's updates until it ends or waits for a decision."""
        caller = caller_of(context)
        with _translated():
            validate_history_length(params.configuration)
            run_id = await _accept(caller, params.message)
        async with aclosing(self._updates(caller, run_id)) as updates:
            async for event in updates:
                yield event

    # --- tasks --------------------------------------------------------------------------

    @validate_request_params
    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        with _translated():
            validate_history_length(params)
            task = task_of(await _record(caller_of(context), params.id))
        return apply_history_length(task, params)

    @validate_request_params
    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        """``POST /v1/runs/{id}/cancel``: soft unless the metadata says ``{"mode": "hard"}``;
        answers once the run has ended, or after ``CANCEL_WAIT_S`` with the task as it is."""
        caller = caller_of(context)
        with _translated():
            record = await _record(caller, params.id)
            if record.status.is_terminal:
                raise TaskNotCancelableError(message=f"task {params.id} has already ended ({record.status.value})")
            mode = _cancel_mode(MessageToDict(params.metadata))
            try:
                await caller.kernel.cancel(record.run_id, mode)
            except errors.Conflict as exc:
                raise TaskNotCancelableError(message=str(exc)) from exc
            async with aclosing(run_events(caller.kernel, record.session_id, record.run_id)) as events:
                try:
                    async with asyncio.timeout(CANCEL_WAIT_S):
                        async for _ in events:
                            pass  # a run's events end with its terminal event
                except TimeoutError:
                    pass  # still on its way to a boundary: the task says so
            return task_of(await _record(caller, record.run_id))

    @validate_request_params
    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[A2AEvent]:
        """The task as it is, then its updates (``tasks/resubscribe``); an ended task has none."""
        caller = caller_of(context)
        with _translated():
            record = await _record(caller, params.id)
        if record.status.is_terminal:
            raise UnsupportedOperationError(message=f"task {params.id} has ended ({record.status.value}): "
                                                    "tasks/get reads it")
        async with aclosing(self._updates(caller, record.run_id, record)) as updates:
            async for event in updates:
                yield event

    async def _updates(self, caller: Caller, run_id: str,
                       record: TaskRecord | None = None) -> AsyncGenerator[A2AEvent]:
        """The task as read now, then what its run does next, until it ends or waits for an answer."""
        with _translated():
            record = record or await _record(caller, run_id)
        yield task_of(record)
        if record.status.is_terminal or record.pending:
            return
        async with aclosing(follow(caller.kernel, record)) as updates:
            async for update in updates:
                yield update

    @validate_request_params
    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        raise UnsupportedOperationError(message="tasks/list is not served here: GET /v1/runs?session_id=... lists "
                                                "a context's runs")

    # --- not offered: push notifications, an extended card --------------------------------

    async def on_create_task_push_notification_config(
            self, params: TaskPushNotificationConfig, context: ServerCallContext) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
            self, params: GetTaskPushNotificationConfigRequest,
            context: ServerCallContext) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
            self, params: ListTaskPushNotificationConfigsRequest,
            context: ServerCallContext) -> ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
            self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext) -> None:
        raise PushNotificationNotSupportedError

    async def on_get_extended_agent_card(self, params: GetExtendedAgentCardRequest,
                                         context: ServerCallContext) -> AgentCard:
        raise ExtendedAgentCardNotConfiguredError


# --- a message in: a new input, a steer, or an answer ----------------------------------------


async def _accept(caller: Caller, message: Message) -> str:
    """Take in ``message`` and return the run (task) that carries it.

    No ``taskId``: a new input of the context's session (a new session without ``contextId``),
    queued behind the session's work like ``POST /v1/sessions/{id}/messages``. A ``taskId``
    of a task in ``input-required``: the answer to its approvals. Of a task the session is
    running: a steer into that run. Of a task that has ended: refused (A2A: a new task).
    """
    kernel = caller.kernel
    if message.task_id:
        record = await _record(caller, message.task_id)
        if message.context_id and message.context_id != record.session_id:
            raise InvalidParamsError(message=f"task {record.run_id} is not of context {message.context_id!r}")
        if record.status.is_terminal:
            raise InvalidParamsError(message=f"task {record.run_id} has ended ({record.status.value}); send the "
                                             "message without taskId, with this contextId, for a new task")
        if record.pending:
            for call_id, decision in decisions_of(message, record.pending).items():
                try:
                    await kernel.decide(record.run_id, call_id, decision)
                except errors.NotFound:
                    pass  # decided meanwhile, through /v1 or another client: the run goes on all the same
            return record.run_id
        if kernel.session_view(record.session_id)["active_run_id"] != record.run_id:
            raise InvalidParamsError(message=f"task {record.run_id} has not started ({record.status.value}): "
                                             "send the message without taskId to queue it after")
        await kernel.submit(record.session_id, content_of(message), mode=Mode.STEER, origin="a2a",
                            idempotency_key=_key(message))
        return record.run_id
    content = content_of(message)
    if message.context_id:
        session_id = await _session(caller, message.context_id)
    else:
        row, _ = await kernel.sessions.create(caller.agent, None, {"channel": "a2a"}, owner=caller.principal.name)
        session_id = str(row["id"])
    accepted = await kernel.submit(session_id, content, origin="a2a", idempotency_key=_key(message))
    return accepted.run_id


def _key(message: Message) -> str | None:
    return f"a2a:{message.message_id}" if message.message_id and len(message.message_id) <= MAX_KEY else None


async def _session(caller: Caller, context_id: str) -> str:
    row = await caller.kernel.store.read(repo.get_session, context_id)
    if row is None or row.agent != caller.agent or not caller.principal.may_access(row.owner):
        raise TaskNotFoundError(message=f"no context {context_id!r} of agent {caller.agent!r}")
    return context_id


async def _record(caller: Caller, task_id: str) -> TaskRecord:
    record = await caller.kernel.store.read(read_record, task_id)
    if record is None or record.agent != caller.agent or not caller.principal.may_access(record.owner):
        raise TaskNotFoundError(message=f"no task {task_id!r} of agent {caller.agent!r}")
    return record


def _cancel_mode(metadata: dict[str, Any]) -> CancelMode:
    mode = metadata.get("mode", CancelMode.SOFT.value)
    try:
        return CancelMode(mode)
    except ValueError:
        raise InvalidParamsError(message="metadata.mode is 'soft' or 'hard'") from None


@contextmanager
def _translated() -> Iterator[None]:
    """Corral's errors as A2A's, at the boundary (the SDK answers anything else as an internal error)."""
    try:
        yield
    except A2AError:
        raise
    except errors.NotFound as exc:
        raise TaskNotFoundError(message=str(exc)) from exc
    except errors.InvalidInput as exc:
        raise InvalidParamsError(message=str(exc)) from exc
    except errors.Conflict as exc:
        raise InvalidRequestError(message=str(exc), data={"code": exc.code}) from exc
    except errors.CorralError as exc:
        # Busy, full, stopping, or a session another node holds: try again later (or there).
        data: dict[str, Any] = {"code": exc.code}
        if isinstance(exc, errors.StoreUnavailable):
            data["retry_after"] = exc.retry_after
        if isinstance(exc, errors.OwnedElsewhere):
            data.update(node=exc.node_id, url=exc.url)
        raise InternalError(message=str(exc), data=data) from exc
