"""The A2A face, driven by the a2a-sdk's own client against a real server on loopback: a context
is a session, a task is a run (docs/a2a.md)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import (
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Value

from corral.settings import PrincipalToken, Settings
from tests.helpers import client, create_agent, uvicorn_server
from tests.test_import_weight import among, loaded_by

LIMIT = 30
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ADMIN = "admin-token-0123456789"
WORDS = " ".join(f"w{i}" for i in range(40))
ASK = {"approvals": {"wait": "ask"}}


@asynccontextmanager
async def a2a(base: str, agent: str = "assistant", *, token: str | None = None,
              streaming: bool = True) -> AsyncIterator[Client]:
    """The SDK's client for ``agent``, made from its card as any A2A client would."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0)) as http:
        sdk = await ClientFactory(ClientConfig(streaming=streaming, httpx_client=http)).create_from_url(
            f"{base}/a2a/{agent}")
        try:
            yield sdk
        finally:
            await sdk.close()


def message(text: str | None = None, *, context_id: str = "", task_id: str = "",
            data: dict[str, Any] | None = None) -> SendMessageRequest:
    parts = [Part(text=text)] if text is not None else []
    if data is not None:
        parts.append(Part(data=ParseDict(data, Value())))
    return SendMessageRequest(message=Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=parts,
                                              context_id=context_id, task_id=task_id))


async def send(sdk: Client, request: SendMessageRequest) -> Task:
    """message/send (a client made with ``streaming=False``): its one answer, a task."""
    answers = [answer async for answer in sdk.send_message(request)]
    assert len(answers) == 1 and answers[0].HasField("task"), answers
    return answers[0].task


async def stream(sdk: Client, request: SendMessageRequest) -> list[StreamResponse]:
    return [event async for event in sdk.send_message(request)]


def final_state(events: list[StreamResponse]) -> TaskState.ValueType:
    last = events[-1]
    return last.status_update.status.state if last.HasField("status_update") else last.task.status.state


def artifact_text(events: list[StreamResponse], start: str = "") -> str:
    """The ``output`` artifact as a client assembles it from chunks (``append`` or replace)."""
    text = start
    for event in events:
        if event.HasField("artifact_update"):
            chunk = "".join(p.text for p in event.artifact_update.artifact.parts)
            text = text + chunk if event.artifact_update.append else chunk
    return text


def output_of(task: Task) -> str:
    return "".join(p.text for a in task.artifacts if a.artifact_id == "output" for p in a.parts)


def pending_calls(task: Task | TaskStatusUpdateEvent) -> list[dict[str, Any]]:
    """The calls an ``input-required`` status asks about (its message's data part)."""
    parts = [MessageToDict(p.data) for p in task.status.message.parts if p.HasField("data")]
    return [call for part in parts for call in part["approvals"]]


async def test_the_card_send_and_get(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        await create_agent(http, "helper", system_prompt="Helps with chores.\nNever lies.",
                           tools=["echo"])
        card = await A2ACardResolver(http, f"{base}/a2a/helper").get_agent_card()
        assert card.name == "helper" and card.description == "Helps with chores."
        assert [skill.id for skill in card.skills] == ["echo"]
        assert card.capabilities.streaming
        assert {i.url for i in card.supported_interfaces} == {f"{base}/a2a/helper"}
        assert {i.protocol_version for i in card.supported_interfaces} == {"1.0", "0.3"}
        assert not card.security_schemes  # no tokens configured: nothing to present

        async with a2a(base, "helper", streaming=False) as sdk:
            task = await send(sdk, message("hello there"))
            assert task.status.state == TaskState.TASK_STATE_COMPLETED
            assert output_of(task) == "echo: hello there"
            assert [(m.role, m.parts[0].text) for m in task.history] == [
                (Role.ROLE_USER, "hello there"), (Role.ROLE_AGENT, "echo: hello there")]
            # The task is the run, the context its session.
            run = (await http.get(f"/v1/runs/{task.id}")).json()
            assert (run["session_id"], run["status"], run["output"]) == (task.context_id, "completed",
                                                                         "echo: hello there")
            assert (await http.get(f"/v1/sessions/{task.context_id}")).json()["agent"] == "helper"

            again = await sdk.get_task(GetTaskRequest(id=task.id))
            assert again.status.state == TaskState.TASK_STATE_COMPLETED and output_of(again) == output_of(task)
            assert len((await sdk.get_task(GetTaskRequest(id=task.id, history_length=1))).history) == 1

            # The same context again: a new task of the same session, after the first.
            second = await send(sdk, message("/recall", context_id=task.context_id))
            assert second.context_id == task.context_id and second.id != task.id
            assert output_of(second) == 'recall: ["hello there"]'

            with pytest.raises(InvalidParamsError):  # an ended task takes no more messages
                await send(sdk, message("more", task_id=task.id))
            with pytest.raises(TaskNotFoundError):
                await send(sdk, message("hi", context_id="ses_nobody"))
            with pytest.raises(TaskNotFoundError):
                await sdk.get_task(GetTaskRequest(id="run_nobody"))

        # A context of another agent is not this agent's.
        async with a2a(base, "assistant", streaming=False) as other:
            with pytest.raises(TaskNotFoundError):
                await other.get_task(GetTaskRequest(id=task.id))
            with pytest.raises(TaskNotFoundError):
                await send(other, message("hi", context_id=task.context_id))

        for path in ("/a2a/nobody/.well-known/agent-card.json", "/a2a/nobody"):
            response = await (http.get(path) if path.endswith(".json") else http.post(path, json={}))
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "not_found"


async def test_a_stream_sends_token_deltas_as_artifact_chunks(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        await create_agent(http, "talker", provider_options={"token_ms": 1})
        async with a2a(base, "talker") as sdk:
            events = await stream(sdk, message(WORDS))
        assert events[0].HasField("task")
        task_id = events[0].task.id
        chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
        assert len(chunks) > 10  # word by word
        assert not chunks[0].append and all(c.append for c in chunks[1:])
        assert chunks[-1].last_chunk and not any(c.last_chunk for c in chunks[:-1])
        assert artifact_text(events) == f"echo: {WORDS}"
        assert final_state(events) == TaskState.TASK_STATE_COMPLETED
        assert all(e.status_update.task_id == task_id for e in events if e.HasField("status_update"))
        run = (await http.get(f"/v1/runs/{task_id}")).json()
        assert run["status"] == "completed" and run["output"] == f"echo: {WORDS}"


async def test_an_approval_is_input_required_then_answered(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        await create_agent(http, "careful", policy=ASK)
        async with a2a(base, "careful", streaming=False) as sdk:
            task = await send(sdk, message('/tool wait {"ms": 1}'))
            assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            [call] = pending_calls(task)
            assert call["tool"] == "wait" and call["arguments"] == {"ms": 1}
            assert (await http.get(f"/v1/runs/{task.id}")).json()["status"] == "waiting"
            assert (await sdk.get_task(GetTaskRequest(id=task.id))).status.state == TaskState.TASK_STATE_INPUT_REQUIRED

            with pytest.raises(InvalidParamsError):  # not an answer: the question stands
                await send(sdk, message("maybe later", task_id=task.id))
            answered = await send(sdk, message("Approve.", task_id=task.id, context_id=task.context_id))
            assert answered.id == task.id
            assert answered.status.state == TaskState.TASK_STATE_COMPLETED
            assert output_of(answered).startswith("tool results: ")

        # Streamed: the stream stops at the question; the answer (a data part) streams the rest.
        async with a2a(base, "careful") as sdk:
            events = await stream(sdk, message('/tool wait {"ms": 1}'))
            assert final_state(events) == TaskState.TASK_STATE_INPUT_REQUIRED
            task_id = events[0].task.id
            [call] = pending_calls(next(e for e in reversed(events) if e.HasField("status_update")).status_update)
            rest = await stream(sdk, message(task_id=task_id, data={"decision": "deny", "call_id": call["call_id"]}))
            assert rest[0].task.id == task_id
            assert final_state(rest) == TaskState.TASK_STATE_COMPLETED
        run = (await http.get(f"/v1/runs/{task_id}")).json()
        assert run["status"] == "completed" and "denied" in run["output"]


async def test_a_message_on_a_working_task_steers_it(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        async with a2a(base) as streaming, a2a(base, streaming=False) as sdk:
            # Two steps of a 1 s wait each: the steer arrives well before the run's next boundary.
            events = streaming.send_message(message("/steps 2 1000"))
            async for event in events:
                if event.HasField("status_update") and event.status_update.metadata["event"] == "tool.started":
                    task_id = event.status_update.task_id
                    break
            await events.aclose()
            steered = await send(sdk, message("faster", task_id=task_id))
            assert steered.id == task_id and steered.status.state == TaskState.TASK_STATE_COMPLETED
            assert output_of(steered) == 'done 2 steps; steering seen: ["faster"]'
            assert [m.parts[0].text for m in steered.history if m.role == Role.ROLE_USER] == ["/steps 2 1000", "faster"]
        runs = (await http.get("/v1/runs", params={"session_id": steered.context_id})).json()["runs"]
        assert [r["id"] for r in runs] == [task_id]  # one run carried both messages


async def test_cancel_a_long_run(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        await create_agent(http, "slow", provider_options={"token_ms": 200})
        async with a2a(base, "slow") as sdk:
            # Soft, as POST /v1/runs/{id}/cancel: the run stops at its next token, keeping what it said.
            events = sdk.send_message(message(WORDS))
            async for event in events:
                if event.HasField("artifact_update"):
                    task_id = event.artifact_update.task_id
                    break
            await events.aclose()
            cancelled = await sdk.cancel_task(CancelTaskRequest(id=task_id))
            assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
            assert output_of(cancelled).startswith("echo: w0")
            assert (await http.get(f"/v1/runs/{task_id}")).json()["status"] == "cancelled"
            with pytest.raises(TaskNotCancelableError):
                await sdk.cancel_task(CancelTaskRequest(id=task_id))

        async with a2a(base, "slow", streaming=False) as sdk:
            # Hard: a model call in the middle of a 30 s sleep stops at once.
            sleeping = await send(sdk, SendMessageRequest(message=message("/sleep 30").message,
                                                          configuration={"return_immediately": True}))
            assert sleeping.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
            request = CancelTaskRequest(id=sleeping.id)
            request.metadata.update({"mode": "hard"})
            stopped = await sdk.cancel_task(request)
            assert stopped.status.state == TaskState.TASK_STATE_CANCELED


async def test_resubscribe_mid_run(settings: Settings) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        await create_agent(http, "talker", provider_options={"token_ms": 50})  # 2 s: time to resubscribe
        async with a2a(base, "talker") as sdk:
            events = sdk.send_message(message(WORDS))
            seen: list[StreamResponse] = []
            async for event in events:
                seen.append(event)
                if event.HasField("artifact_update"):
                    break
            await events.aclose()  # the client goes away; the run goes on
            task_id = seen[0].task.id

            resumed = [e async for e in sdk.subscribe(SubscribeToTaskRequest(id=task_id))]
            assert resumed[0].HasField("task") and resumed[0].task.id == task_id
            assert resumed[0].task.status.state == TaskState.TASK_STATE_WORKING
            # The first chunk after the task carries what the run had already said.
            first_chunk = next(e.artifact_update for e in resumed if e.HasField("artifact_update"))
            assert not first_chunk.append
            assert final_state(resumed) == TaskState.TASK_STATE_COMPLETED
            assert artifact_text(resumed) == f"echo: {WORDS}"

            with pytest.raises(UnsupportedOperationError):  # an ended task has nothing more to send
                async for _ in sdk.subscribe(SubscribeToTaskRequest(id=task_id)):
                    pass
        assert (await http.get(f"/v1/runs/{task_id}")).json()["output"] == f"echo: {WORDS}"


def auth_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, api_token=ADMIN, shutdown_grace_s=1.0,
                    principals=[PrincipalToken(name="alice", token=ALICE), PrincipalToken(name="bob", token=BOB)])


async def test_principals_apply(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), uvicorn_server(auth_settings(tmp_path)) as (base, _kernel, _server):
        async with client(base) as anonymous, client(base, headers={"Authorization": f"Bearer {ALICE}"}) as alice:
            # The card is open, and says a token is needed; the endpoint is not open.
            card = await A2ACardResolver(anonymous, f"{base}/a2a/assistant").get_agent_card()
            assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
            assert [list(r.schemes) for r in card.security_requirements] == [["bearer"]]
            denied = await anonymous.post("/a2a/assistant", json={"jsonrpc": "2.0", "id": 1, "method": "GetTask",
                                                                   "params": {"id": "run_x"}})
            assert denied.status_code == 401
            await create_agent(alice, "careful", policy=ASK)

        async with a2a(base, "careful", token=ALICE, streaming=False) as as_alice, \
                a2a(base, "careful", token=BOB, streaming=False) as as_bob:
            done = await send(as_alice, message("mine"))
            waiting = await send(as_alice, message('/tool wait {"ms": 1}', context_id=done.context_id))
            assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED

            for task_id in (done.id, waiting.id):
                with pytest.raises(TaskNotFoundError):
                    await as_bob.get_task(GetTaskRequest(id=task_id))
                with pytest.raises(TaskNotFoundError):
                    await as_bob.cancel_task(CancelTaskRequest(id=task_id))
            with pytest.raises(TaskNotFoundError):
                await send(as_bob, message("approve", task_id=waiting.id))
            with pytest.raises(TaskNotFoundError):
                await send(as_bob, message("hijack", context_id=done.context_id))
            async with a2a(base, "careful", token=BOB) as bob_streaming:
                with pytest.raises(TaskNotFoundError):
                    async for _ in bob_streaming.subscribe(SubscribeToTaskRequest(id=waiting.id)):
                        pass
            # Bob's own message is a session of his own.
            his = await send(as_bob, message("his"))
            assert his.context_id != done.context_id

            # Nothing Bob did touched Alice's task: it still waits for her.
            still = await as_alice.get_task(GetTaskRequest(id=waiting.id))
            assert still.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            assert (await send(as_alice, message("approve", task_id=waiting.id))).status.state == \
                TaskState.TASK_STATE_COMPLETED


async def test_tasks_survive_a_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT):
        async with uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
            await create_agent(http, "careful", policy=ASK)
            async with a2a(base, "careful", streaming=False) as sdk:
                done = await send(sdk, message("before the restart"))
                waiting = await send(sdk, message('/tool wait {"ms": 1}'))
                assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED

        async with uvicorn_server(settings) as (base, _kernel, _server):
            async with a2a(base, "careful", streaming=False) as sdk:
                again = await sdk.get_task(GetTaskRequest(id=done.id))
                assert again.status.state == TaskState.TASK_STATE_COMPLETED
                assert output_of(again) == "echo: before the restart"
                assert [m.parts[0].text for m in again.history] == [m.parts[0].text for m in done.history]
                parked = await sdk.get_task(GetTaskRequest(id=waiting.id))
                assert parked.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
                answered = await send(sdk, message("approve", task_id=waiting.id))
                assert answered.status.state == TaskState.TASK_STATE_COMPLETED


async def test_a2a_0_3_method_names(settings: Settings) -> None:
    """Clients of A2A 0.3 call ``message/send``, ``tasks/get``, ``tasks/cancel`` on the same endpoint."""

    async def call(http: httpx.AsyncClient, method: str, params: dict[str, Any]) -> dict[str, Any]:
        response = await http.post("/a2a/assistant", json={"jsonrpc": "2.0", "id": method, "method": method,
                                                           "params": params})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server), client(base) as http:
        sent = await call(http, "message/send", {"message": {
            "kind": "message", "messageId": "m1", "role": "user", "parts": [{"kind": "text", "text": "old school"}]}})
        task = sent["result"]
        assert task["kind"] == "task" and task["status"]["state"] == "completed"
        assert task["artifacts"][0]["parts"][0]["text"] == "echo: old school"
        got = await call(http, "tasks/get", {"id": task["id"]})
        assert got["result"]["contextId"] == task["contextId"]
        refused = await call(http, "tasks/cancel", {"id": task["id"]})
        assert refused["error"]["code"] == -32002  # TaskNotCancelableError


def test_the_sdk_loads_with_the_first_a2a_request_not_with_the_server() -> None:
    # Most of a second of imports (protobuf and all), paid by the first A2A call instead of every start.
    assert among(loaded_by("import corral.api.app; corral.api.app.create_app"), ("a2a", "google.protobuf")) == []
