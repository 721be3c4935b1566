"""Request-scoped access to the kernel the lifespan created and to the caller (no globals)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import Scope

from corral.errors import Forbidden, NotFound
from corral.kernel import Kernel
from corral.principals import LOCAL, Principal
from corral.store import repo


def kernel_of(request: Request) -> Kernel:
    kernel: Kernel = request.app.state.kernel
    return kernel


def principal_of(request: Request) -> Principal:
    return principal_in(request.scope)


def principal_in(scope: Scope) -> Principal:
    # Set by the Authenticate middleware; an app built without it serves the local admin.
    principal: Principal | None = scope.get("state", {}).get("principal")
    return principal or LOCAL


# The dependencies are ``async`` although they never await: FastAPI runs a plain ``def``
# dependency in a worker thread, two thread hand-offs per request for a dictionary lookup.
# A turn's own route takes the request and calls the functions above instead: FastAPI
# inspects every dependency again on every request, which under load cost more of the
# event loop than the route's own work (docs/benchmarks.md).
async def get_kernel(request: Request) -> Kernel:
    return kernel_of(request)


async def get_principal(request: Request) -> Principal:
    return principal_of(request)


KernelDep = Annotated[Kernel, Depends(get_kernel)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden(f"principal {principal.name!r} may not do this: it is for admins")


async def owned_session(kernel: Kernel, principal: Principal, session_id: str) -> Any:
    """The session's row, or NotFound, also when it exists but belongs to someone else:
    a stranger learns nothing, not even that the id is taken."""
    row = await kernel.store.read(repo.get_session, session_id)
    if row is None or not principal.may_access(row.owner):
        raise NotFound(f"no session {session_id!r}")
    return row


async def check_session(kernel: Kernel, principal: Principal, session_id: str) -> None:
    """Like ``owned_session`` for the hot path: a live session answers from memory."""
    live = kernel.sessions.live(session_id)
    if live is None:
        await owned_session(kernel, principal, session_id)
    elif not principal.may_access(live.owner):
        raise NotFound(f"no session {session_id!r}")


async def owned_run(kernel: Kernel, principal: Principal, run_id: str) -> Any:
    """The run's row, or NotFound when it does not exist or is in someone else's session."""
    row, owner = await kernel.store.read(repo.run_and_owner, run_id)
    if row is None or owner is None or not principal.may_access(owner):
        raise NotFound(f"no run {run_id!r}")
    return row


def held_run(kernel: Kernel, run_id: str) -> tuple[str, str] | None:
    """An unfinished run of a session this node holds, from memory: (its session, the session's
    owner); None for any other run (ended, held elsewhere, unknown), which the store answers."""
    handle = kernel.runs.get(run_id)
    live = kernel.sessions.live(handle.session_id) if handle is not None else None
    return (live.id, live.owner) if live is not None else None
