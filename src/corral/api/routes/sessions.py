"""Sessions and the messages sent to them."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from corral.api.deps import KernelDep, PrincipalDep, check_session, kernel_of, owned_session, principal_of
from corral.api.json_body import CheckedRoute
from corral.api.retry_advice import outcome_headers
from corral.api.routes.events import answer_with_stream, wants_stream
from corral.api.schemas import MAX_INT64, AcceptedOut, ChildOut, MessageIn, MessageOut, SessionIn, SessionOut
from corral.kernel import Kernel
from corral.store import repo

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=CheckedRoute)
# The other answer of POST .../messages: the run's events (routes/events.py, answer_with_stream).
STREAMED: dict[int | str, dict[str, Any]] = {200: {
    "description": "With `Accept: text/event-stream` or `?stream=true`: the run's events, as "
                   "`GET /v1/runs/{id}/events` streams them (`x-corral-run-id` names the run)",
    "content": {"text/event-stream": {}}}}


def session_out(kernel: Kernel, row: Any, last_event_seq: int = 0) -> SessionOut:
    data = dict(row) if isinstance(row, dict) else dict(row._mapping)
    return SessionOut(**data, **kernel.session_view(data["id"]), last_event_seq=last_event_seq)


@router.post("", status_code=201)
async def create_session(body: SessionIn, kernel: KernelDep, principal: PrincipalDep, response: Response) -> SessionOut:
    kernel.agents.get(body.agent)  # 404 for an unknown agent, before anything is stored
    row, created = await kernel.sessions.create(body.agent, body.key, body.metadata, owner=principal.name)
    if not created:
        response.status_code = 200
    return session_out(kernel, row)


@router.get("")
async def list_sessions(
    kernel: KernelDep,
    principal: PrincipalDep,
    agent: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
) -> list[SessionOut]:
    owner = None if principal.admin else principal.name
    rows, seqs = await kernel.store.read(repo.sessions_page, owner=owner, agent=agent, limit=limit, offset=offset)
    return [session_out(kernel, row, seqs.get(row.id, 0)) for row in rows]


@router.get("/{session_id}")
async def get_session(session_id: str, kernel: KernelDep, principal: PrincipalDep) -> SessionOut:
    row = await owned_session(kernel, principal, session_id)
    seqs, link, children = await kernel.store.read(repo.session_detail, session_id)
    out = session_out(kernel, row, seqs.get(session_id, 0))
    out.parent_session_id = link.parent_session_id if link is not None else None
    out.children = [ChildOut(session_id=c.child_session_id, task=c.task, status=c.status, result=c.result,
                             created_at=c.created_at) for c in children]
    return out


@router.get("/{session_id}/messages")
async def list_messages(
    session_id: str, kernel: KernelDep, principal: PrincipalDep, include_rolled_back: bool = True
) -> list[MessageOut]:
    await owned_session(kernel, principal, session_id)
    rows = await kernel.store.read(repo.session_messages, session_id, include_rolled_back=include_rolled_back)
    return [MessageOut.model_validate(dict(row._mapping)) for row in rows]


@router.post("/{session_id}/messages", status_code=202, response_model=AcceptedOut, responses=STREAMED)
async def post_message(
    session_id: str,
    body: MessageIn,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Every turn comes through here, so it skips two per-request costs of FastAPI: solving
    the kernel and caller as dependencies, and validating the answer again on its way out."""
    kernel, principal = kernel_of(request), principal_of(request)
    await check_session(kernel, principal, session_id)
    submit = partial(kernel.submit, session_id, body.content, mode=body.mode, policy=body.policy,
                     debounce_ms=body.debounce_ms, idempotency_key=idempotency_key)
    # One request: with `Accept: text/event-stream` (or ?stream=true) the answer is the run's
    # events, as GET /v1/runs/{id}/events streams them (routes/events.py).
    if wants_stream(request):
        return await answer_with_stream(request, kernel, session_id, submit)
    accepted = await submit()
    out = AcceptedOut(input_id=accepted.input_id, run_id=accepted.run_id, session_id=accepted.session_id,
                      disposition=accepted.disposition)
    # Accepted: a retry without the same Idempotency-Key would be a second input (api/retry_advice.py).
    return Response(out.model_dump_json(), status_code=202, media_type="application/json", headers=outcome_headers())
