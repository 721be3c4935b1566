"""The OpenAPI document clients are generated from: every answer an operation can give.

FastAPI's own document lists a route's success and its 422 only, describes the 422 with a
body Corral never sends, shows Server-Sent Event streams as JSON, has no request body for
the OpenAI route (which parses its own, to answer 400 as OpenAI does), and takes route
docstrings (written for whoever maintains the code) as descriptions. A client generated
from it failed on answers it was never told about (the 200 of a session key's second call).

So the document is FastAPI's, rewritten here from ``OPERATIONS``: a summary and description
written for users, and the statuses each operation answers beyond the rules every operation
shares (``_shared_errors``). Every error is the one envelope (``Error``); streams are
``text/event-stream``; bearer auth is declared, and the operations open without a token say
so. A test checks that every route has its entry here, so a new route cannot go undocumented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from corral import __version__
from corral.api.openai_schemas import ChatCompletionIn
from corral.api.routes.responses import ResponseIn


@dataclass(frozen=True)
class Operation:
    summary: str
    description: str = ""
    # Statuses beyond the shared ones: status -> when it is answered.
    answers: dict[int, str] = field(default_factory=dict)
    # The success is a Server-Sent Events stream (only, or as well, when the client asks).
    stream: bool = False
    open: bool = False  # answered without a token
    # Statuses whose body is the operation's own, not the error envelope (readiness's 503).
    own_bodies: tuple[int, ...] = ()


STATUS_TEXT_400_OPENAI = "the body is not valid JSON, or any invalid request (OpenAI's routes answer 400)"

NOT_RUNNING = "the channel is not running now; `Retry-After` says when to send again"
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/sessions"): Operation(
        "Create a session",
        "A conversation with one agent. With a `key`, creating is idempotent: a second call with the "
        "same key answers 200 with the session the first created.",
        {200: "a session with this key exists already: that session", 404: "no such agent"}),
    ("GET", "/v1/sessions"): Operation("List sessions", "The caller's sessions, newest first."),
    ("GET", "/v1/sessions/{session_id}"): Operation("Get a session"),
    ("GET", "/v1/sessions/{session_id}/messages"): Operation("List a session's messages",
                                                             "The conversation as the agent sees it."),
    ("POST", "/v1/sessions/{session_id}/messages"): Operation(
        "Send a message",
        "Accepted (202) once stored; `mode` says what happens when the session is busy. With "
        "`Accept: text/event-stream` (or `?stream=true`) the answer is the run's event stream instead. "
        "`Idempotency-Key` makes a retry return the first call's input and run.",
        {409: "`mode: reject` while the session is busy, or a run to steer has ended",
         429: "the session already has `max_pending_inputs` inputs waiting"},
        stream=True),
    ("GET", "/v1/sessions/{session_id}/events"): Operation(
        "Stream a session's events",
        "Every event of the session, live; resumes after `Last-Event-ID` (or `?after=SEQ`).", stream=True),
    ("GET", "/v1/runs/{run_id}/events"): Operation(
        "Stream a run's events", "From the run's first event to its end, then the stream closes.", stream=True),
    ("GET", "/v1/feed"): Operation(
        "Stream the feed",
        "Every event but token deltas across the caller's sessions, plus `session.created`. The first "
        "frame is `ready`; after it (or a `resync`) read current state from the listings.", stream=True),
    ("GET", "/v1/runs"): Operation("List runs", "The caller's runs, newest first, filtered by the query."),
    ("GET", "/v1/runs/{run_id}"): Operation("Get a run"),
    ("POST", "/v1/runs/{run_id}/cancel"): Operation(
        "Stop a run", "`soft` lets the current step finish; `hard` cancels at once."),
    ("POST", "/v1/runs/{run_id}/approvals/{call_id}"): Operation(
        "Decide a tool call", "Approve or deny a call the run waits on.",
        {409: "the call is not waiting for a decision (decided already, or the run ended)"}),
    ("GET", "/v1/agents"): Operation("List agents"),
    ("POST", "/v1/agents"): Operation("Create an agent", "", {409: "an agent of this name exists"}),
    ("GET", "/v1/agents/{name}"): Operation("Get an agent"),
    ("DELETE", "/v1/agents/{name}"): Operation(
        "Delete an agent", "Admins only: agents are shared by every principal.", {403: "the caller is no admin"}),
    ("POST", "/v1/agents/{name}/restart"): Operation(
        "Restart an agent", "Admins only. A fresh start (a new generation); its runs in flight fail.",
        {403: "the caller is no admin"}),
    ("GET", "/v1/jobs"): Operation("List scheduled jobs"),
    ("POST", "/v1/jobs"): Operation("Schedule a job", "A message sent on a schedule (once, every N seconds, or cron)."),
    ("GET", "/v1/jobs/{job_id}"): Operation("Get a job"),
    ("DELETE", "/v1/jobs/{job_id}"): Operation("Delete a job"),
    ("GET", "/v1/jobs/{job_id}/fires"): Operation("List a job's fires"),
    ("GET", "/v1/models"): Operation("List models", "Every agent, as an OpenAI model."),
    ("GET", "/v1/models/{model_id}"): Operation("Get a model", "One agent, as an OpenAI model."),
    ("POST", "/v1/chat/completions"): Operation(
        "Create a chat completion",
        "OpenAI's chat completions: `model` is an agent, the last message is the turn's input, "
        "`X-Corral-Session` (or `user`) keeps a durable conversation. The request's own `tools` are run by the "
        "client: a call of one comes back as `tool_calls`, and messages ending with `role: tool` results resume "
        "the same run. Bad requests answer 400, as OpenAI's do. "
        "`x-should-retry: false` says when a retry would start another run.",
        {404: "no agent of this `model`", 409: "the run was stopped (`run_cancelled`) or interrupted",
         502: "the run failed (`run_failed`)"},
        stream=True),
    ("POST", "/v1/responses"): Operation(
        "Create a response",
        "OpenAI's Responses API: `model` is an agent, a response is a run (`resp_<run id>`), its session the "
        "conversation (`previous_response_id` continues it). `stream` answers with OpenAI's response events; "
        "`background` answers at once. A run that fails or is cancelled is a response with that `status`. "
        "Bad requests answer 400, as OpenAI's do.",
        {400: STATUS_TEXT_400_OPENAI, 404: "no agent of this `model`, or no such `previous_response_id`"},
        stream=True),
    ("GET", "/v1/responses/{response_id}"): Operation(
        "Get a response",
        "The response as it stands; with `?stream=true` its events from `starting_after + 1` (the same "
        "`sequence_number`s as the first stream), then live until it ends.", stream=True),
    ("POST", "/v1/responses/{response_id}/cancel"): Operation(
        "Cancel a response", "Stops the run (a soft cancel) and answers the response once it has ended."),
    ("GET", "/healthz"): Operation(
        "Liveness", "200 while the process serves; the body tells whether the store takes writes.", open=True),
    ("GET", "/readyz"): Operation(
        "Readiness", "200 when this node takes writes; 503 with the reasons when it should get no traffic.",
        {503: "not ready: the body's `reasons` say why; `Retry-After` says when to ask again"}, open=True,
        own_bodies=(503,)),
    ("GET", "/metrics"): Operation("Prometheus metrics"),
    ("GET", "/v1/me"): Operation("Who the caller is"),
    ("GET", "/v1/cluster"): Operation("The cluster's nodes", "Each node's state, heartbeat age and sessions."),
    ("GET", "/v1/channels"): Operation("List chat channels", "Admins only.", {403: "the caller is no admin"}),
    ("GET", "/v1/channels/{name}"): Operation("Get a chat channel", "Admins only.", {403: "the caller is no admin"}),
    ("POST", "/v1/channels/{name}/restart"): Operation(
        "Restart a chat channel", "Admins only.", {403: "the caller is no admin"}),
    ("GET", "/v1/channels/{name}/outbox"): Operation(
        "A channel's outbox", "Admins only. `?status=failed` lists the deliveries given up.",
        {403: "the caller is no admin"}),
    ("POST", "/v1/channels/{name}/inbound"): Operation(
        "Webhook channel: a message in", "Signed with the channel's secret (docs/channels.md).",
        {401: "the signature or timestamp is wrong", 503: NOT_RUNNING}, open=True),
    ("POST", "/v1/channels/{name}/telegram"): Operation(
        "Telegram channel: an update in", "Telegram's webhook; checked by its secret token header.",
        {401: "the secret token header is wrong", 503: NOT_RUNNING}, open=True),
    ("POST", "/v1/channels/{name}/slack/events"): Operation(
        "Slack channel: an Events API request in", "Slack's Events API and interactivity; checked by its "
        "signing secret. Retries are recognised by `x-slack-retry-num` and acknowledged once.",
        {401: "the signature or timestamp is wrong", 503: NOT_RUNNING}, open=True),
}

# The routes that parse their own bodies, by hand: the body each takes.
OWN_BODIES: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionIn, "/v1/responses": ResponseIn}

STATUS_TEXT = {
    400: "the body is not valid JSON (`malformed_json`), or, on OpenAI's routes, any invalid request",
    401: "no valid API token (`unauthorized`); only when tokens are configured",
    404: "no such resource (`not_found`), or one the caller does not own",
    413: "the body is over `max_body_bytes` (`body_too_large`)",
    422: "the request is not valid (`invalid_input`); `details` lists each problem",
    500: "a bug (`internal`)",
    503: "the store takes no writes now (`store_unavailable`), the service is stopping, or the session's node "
         "did not answer; `Retry-After` says when to try again",
}
STREAM_CONTENT = {"text/event-stream": {"schema": {"type": "string"},
                                        "example": 'id: 3\nevent: message.delta\ndata: {"text": "hi", "seq": 3}\n\n'}}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message", "type"],
        "properties": {
            "code": {"type": "string", "description": "what went wrong, for programs: `not_found`, `invalid_input`..."},
            "message": {"type": "string", "description": "what went wrong, for people"},
            "type": {"type": "string", "description": "OpenAI's error class: `invalid_request_error`..."},
            "details": {"type": "array", "items": {"type": "object"}, "description": "422: each problem found"},
        },
        "additionalProperties": True,
    }},
}


def _shared_errors(path: str, op: dict[str, Any], spec: Operation) -> dict[int, str]:
    statuses = {500: STATUS_TEXT[500]}
    if not spec.open:
        statuses[503] = STATUS_TEXT[503]
        if path.startswith("/v1/") or path == "/metrics":
            statuses[401] = STATUS_TEXT[401]
    parameters = op.get("parameters", [])
    if any(p.get("in") == "path" for p in parameters):
        statuses[404] = STATUS_TEXT[404]
    if "requestBody" in op:
        statuses.update({400: STATUS_TEXT[400], 413: STATUS_TEXT[413], 422: STATUS_TEXT[422]})
    elif any(p.get("in") != "path" for p in parameters):
        statuses[422] = STATUS_TEXT[422]
    return statuses


def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _rewrite(path: str, method: str, op: dict[str, Any], spec: Operation) -> None:
    op["summary"] = spec.summary
    op["description"] = spec.description
    if spec.open:
        op["security"] = []
    responses: dict[str, Any] = op["responses"]
    answers = {**_shared_errors(path, op, spec), **spec.answers}
    if path in OWN_BODIES:
        answers.pop(422, None)  # OpenAI's route answers 400 for any bad request
        answers[400] = STATUS_TEXT[400]
    for status, when in sorted(answers.items()):
        if status < 400 or status in spec.own_bodies:
            same = responses.get(str(status)) or responses.get("200") or next(iter(responses.values()))
            responses[str(status)] = {**same, "description": when}
        else:
            responses[str(status)] = _error_response(when)
    if "422" in responses and 422 not in answers:
        del responses["422"]
    if spec.stream:
        if method == "GET":
            responses["200"]["content"] = dict(STREAM_CONTENT)
        else:  # JSON by default; the stream when the client asks for it
            streamed = responses.setdefault("200", {"description": "the run's events, when the client asks"})
            streamed.setdefault("content", {}).update(STREAM_CONTENT)


def document(app: FastAPI) -> dict[str, Any]:
    """The document ``GET /openapi.json`` serves (cached by FastAPI after the first call)."""
    doc = get_openapi(title="Corral", version=__version__, routes=app.routes,  # ids: see operation_id
                      description="Many agents and conversations at once, durable on SQLite or Postgres. "
                                  "Every error is `{error: {code, message, type}}`.")
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    for model in OWN_BODIES.values():  # the OpenAI routes parse their own bodies (to answer 400)
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "`Authorization: Bearer TOKEN`, required once any token is configured"}}
    doc["security"] = [{"bearer": []}]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            # A route without an entry keeps FastAPI's text; tests/api/test_openapi.py refuses one.
            spec = OPERATIONS.get((method.upper(), path)) or Operation(op.get("summary", ""))
            if path in OWN_BODIES:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{OWN_BODIES[path].__name__}"}}}}
            _rewrite(path, method.upper(), op, spec)
    return doc


def operation_id(route: APIRoute) -> str:
    """A route's operationId, and so a generated client's function: ``create_session``."""
    return route.name


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
