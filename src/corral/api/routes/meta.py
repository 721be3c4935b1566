"""Service health and the caller's own identity."""

from __future__ import annotations

from fastapi import APIRouter, Request

from corral import __version__
from corral.api.deps import PrincipalDep

router = APIRouter(tags=["meta"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    kernel = getattr(request.app.state, "kernel", None)
    state = "stopping" if kernel is None or kernel.stopping.is_set() else "ok"
    return {"status": state, "version": __version__}


@router.get("/v1/me")
async def me(principal: PrincipalDep, request: Request) -> dict[str, str | bool]:
    """Who the token belongs to; the web page asks before it shows anything."""
    return {"principal": principal.name, "admin": principal.admin,
            "auth_required": bool(request.app.state.auth_required)}
