"""Service health and the caller's own identity."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from corral import __version__
from corral.api.deps import KernelDep, PrincipalDep
from corral.api.json_body import CheckedRoute
from corral.kernel.repair import RETRY_AFTER_S

router = APIRouter(tags=["meta"], route_class=CheckedRoute)


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str | bool]:
    """Liveness: 200 while the process serves. The body also tells whether the store takes
    writes (``store``: ``ok``, ``unwritable``, ``unknown``) and whether ``/readyz`` would say ready."""
    kernel = getattr(request.app.state, "kernel", None)
    if kernel is None:
        return {"status": "stopping", "version": __version__, "store": "unknown", "ready": False}
    state = "stopping" if kernel.stopping.is_set() else "ok"
    return {"status": state, "version": __version__, "store": kernel.readiness.store_state,
            "ready": not kernel.readiness.reasons()}


@router.get("/readyz", responses={503: {"description": "not ready: the body's reasons say why"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness, for load balancers: 200 when this node takes writes; 503 with the reasons when
    the store's last write failed (a full disk), start-up work waits for the store, a session is
    repairing a write, or the service is stopping. Reads may still be served meanwhile."""
    kernel = getattr(request.app.state, "kernel", None)
    reasons = await kernel.readiness.check() if kernel is not None else ["stopping: the service is not running"]
    store = kernel.readiness.store_state if kernel is not None else "unknown"
    body = {"status": "not_ready" if reasons else "ready", "reasons": reasons, "store": store, "version": __version__}
    if not reasons:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"retry-after": str(max(1, round(RETRY_AFTER_S)))})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(kernel: KernelDep) -> PlainTextResponse:
    """Prometheus exposition; behind the API token like the rest of the API (a scraper sends one)."""
    return PlainTextResponse(kernel.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/me")
async def me(principal: PrincipalDep, request: Request) -> dict[str, str | bool]:
    """Who the token belongs to; the web page asks before it shows anything."""
    return {"principal": principal.name, "admin": principal.admin,
            "auth_required": bool(request.app.state.auth_required)}
