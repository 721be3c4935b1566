"""The OpenAPI document is complete and honest (issue 16): a client generated from it works,
every route is described for users, and what the server answers is what the document says."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.api import create_app
from corral.api.openapi import OPERATIONS
from corral.settings import Settings
from tests.helpers import assert_error, uvicorn_server

LIMIT = 90
JSON = {"content-type": "application/json"}
GENERATOR = Path(sys.executable).with_name("openapi-python-client")


@pytest.fixture
def document(tmp_path: Path) -> dict[str, Any]:
    return create_app(Settings(data_dir=tmp_path)).openapi()


def test_every_route_is_described_for_users(document: dict[str, Any]) -> None:
    routes = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert routes - set(OPERATIONS) == set(), "routes without an entry in api/openapi.py"
    assert set(OPERATIONS) - routes == set(), "entries for routes that no longer exist"
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            spec = OPERATIONS[(method.upper(), path)]
            assert (op["summary"], op["description"]) == (spec.summary, spec.description)
            assert "_v1_" not in op["operationId"], op["operationId"]


def test_every_error_is_the_envelope_and_streams_are_event_streams(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in str(document)  # FastAPI's {detail}, which Corral never sends
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            spec = OPERATIONS[(method.upper(), path)]
            for status, answer in op["responses"].items():
                if int(status) >= 400 and int(status) not in spec.own_bodies:
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if spec.stream:
                assert "text/event-stream" in op["responses"]["200"]["content"], (method, path)
            assert op.get("security") == ([] if spec.open else None), (method, path)
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionIn"}
    assert {"200", "201"} <= set(document["paths"]["/v1/sessions"]["post"]["responses"])


def _declared(document: dict[str, Any], method: str, path: str) -> set[int]:
    return {int(status) for status in document["paths"][path][method.lower()]["responses"]}


async def test_what_the_server_answers_is_declared_and_every_error_has_the_shape(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            document = (await http.get("/openapi.json")).json()
            created = await http.post("/v1/sessions", json={"key": "k"})
            again = await http.post("/v1/sessions", json={"key": "k"})
            session = created.json()["id"]
            calls: list[tuple[str, str, httpx.Response]] = [
                ("POST", "/v1/sessions", created),
                ("POST", "/v1/sessions", again),
                ("POST", "/v1/sessions", await http.post("/v1/sessions", content=b"{", headers=JSON)),
                ("POST", "/v1/sessions", await http.post("/v1/sessions", json={"agent": "nobody"})),
                ("POST", "/v1/sessions", await http.post("/v1/sessions", json={"metadata": []})),
                ("POST", "/v1/sessions", await http.post("/v1/sessions", content=b"x" * 2_000_000)),
                ("GET", "/v1/runs/{run_id}", await http.get("/v1/runs/run_nope")),
                ("POST", "/v1/runs/{run_id}/cancel", await http.post("/v1/runs/run_nope/cancel")),
                ("POST", "/v1/sessions/{session_id}/messages",
                 await http.post("/v1/sessions/ses_nope/messages", json={"content": "x"})),
                ("POST", "/v1/sessions/{session_id}/messages",
                 await http.post(f"/v1/sessions/{session}/messages", json={"content": "/sleep 5"})),
                ("POST", "/v1/sessions/{session_id}/messages",
                 await http.post(f"/v1/sessions/{session}/messages", json={"content": "x", "mode": "reject"})),
                ("POST", "/v1/chat/completions", await http.post("/v1/chat/completions", json={"model": "nobody",
                 "messages": [{"role": "user", "content": "hi"}]})),
                ("POST", "/v1/chat/completions", await http.post("/v1/chat/completions", json={"model": "assistant"})),
                ("POST", "/v1/chat/completions", await http.post("/v1/chat/completions", json={"model": "assistant",
                 "messages": [{"role": "user", "content": "/fail boom"}]})),
                ("GET", "/v1/models/{model_id}", await http.get("/v1/models/nobody")),
                ("DELETE", "/v1/jobs/{job_id}", await http.delete("/v1/jobs/job_nope")),
            ]
            for method, path, response in calls:
                assert response.status_code in _declared(document, method, path), (method, path, response.text)
                if response.status_code >= 400:
                    assert_error(response, response.status_code)
            assert {r.status_code for _, _, r in calls} >= {200, 201, 202, 400, 404, 409, 413, 422, 502}
            # Not an operation, but the same envelope, and an honest Allow.
            wrong_method = await http.put("/v1/agents")
            assert_error(wrong_method, 405, "method_not_allowed")
            assert wrong_method.headers.get_list("allow") == ["GET, POST"]  # one header, every method
            assert_error(await http.get("/v1/no/such/route"), 404, "not_found")


async def test_a_generated_client_drives_the_api(tmp_path: Path) -> None:
    """openapi-python-client, from the served document, as a user would generate it."""
    settings = Settings(data_dir=tmp_path / "data", shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT), uvicorn_server(settings) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            (tmp_path / "openapi.json").write_bytes((await http.get("/openapi.json")).content)
        (tmp_path / "config.yaml").write_text("post_hooks: []\npackage_name_override: corral_client\n")
        generated = await asyncio.to_thread(
            subprocess.run, [str(GENERATOR), "generate", "--path", "openapi.json", "--config", "config.yaml",
                             "--meta", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stdout + generated.stderr
        await asyncio.to_thread(_drive_generated_client, tmp_path, base)


def _drive_generated_client(where: Path, base: str) -> None:
    sys.path.insert(0, str(where))
    try:
        generated = importlib.import_module("corral_client")
        with generated.Client(base_url=base, raise_on_unexpected_status=True) as client:
            _calls(client)
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == "corral_client" or m.startswith("corral_client.")]:
            del sys.modules[name]


def _calls(client: Any) -> None:
    def operation(name: str) -> Any:
        return importlib.import_module(f"corral_client.api.{name}")

    models = importlib.import_module("corral_client.models")
    create = operation("sessions.create_session")
    first = create.sync_detailed(client=client, body=models.SessionIn(key="gen"))
    second = create.sync_detailed(client=client, body=models.SessionIn(key="gen"))  # the key's second call
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.parsed.id == second.parsed.id
    accepted = operation("sessions.post_message").sync_detailed(
        first.parsed.id, client=client, body=models.MessageIn(content="hello"))
    assert accepted.status_code == 202
    run_id = accepted.parsed.run_id
    frames = operation("events.run_events").sync_detailed(run_id, client=client)
    assert frames.status_code == 200 and b"event: run.completed" in frames.content
    get_run = operation("runs.get_run")
    assert get_run.sync(run_id, client=client).output == "echo: hello"
    missing = get_run.sync_detailed("run_nope", client=client)
    assert missing.status_code == 404 and missing.parsed.error.code == "not_found"
    answer = operation("openai.chat_completions").sync_detailed(client=client, body=models.ChatCompletionIn.from_dict(
        {"model": "assistant", "messages": [{"role": "user", "content": "hi there"}]}))
    assert answer.status_code == 200, answer.content
    assert b"echo: hi there" in answer.content
