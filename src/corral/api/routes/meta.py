"""Service health and the caller's own identity."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from corral import __version__
from corral.api.deps import KernelDep, PrincipalDep

router = APIRouter(tags=["meta"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    kernel = getattr(request.app.state, "kernel", None)
    state = "stopping" if kernel is None or kernel.stopping.is_set() else "ok"
    return {"status": state, "version": __version__}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(kernel: KernelDep) -> PlainTextResponse:
    """Prometheus exposition; behind the API token like the rest of the API (a scraper sends one)."""
    return PlainTextResponse(kernel.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/me")
async def me(principal: PrincipalDep, request: Request) -> dict[str, str | bool]:
    """Who the token belongs to; the web page asks before it shows anything."""
    return {"principal": principal.name, "admin": principal.admin,
            "auth_required": bool(request.app.state.auth_required)}
