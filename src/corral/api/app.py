"""The FastAPI application: routes, error mapping, limits, and the kernel's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from corral import __version__
from corral.api import errors
from corral.api.limits import BodyLimit, TokenAuth
from corral.api.routes import agents, events, runs, sessions
from corral.kernel import Kernel
from corral.settings import Settings
from corral.store import Store


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.resolved_database_url(), sqlite_synchronous=settings.sqlite_synchronous)
        kernel = Kernel(store, settings.kernel_config(), initial_agents=settings.initial_agents())
        async with kernel.running():
            app.state.kernel = kernel
            yield

    app = FastAPI(title="Corral", version=__version__, lifespan=lifespan)
    errors.install(app)
    for module in (agents, sessions, runs, events):
        app.include_router(module.router)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        kernel: Kernel | None = getattr(app.state, "kernel", None)
        state = "stopping" if kernel is None or kernel.stopping.is_set() else "ok"
        return {"status": state, "version": __version__}

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_token is not None:
        app.add_middleware(TokenAuth, token=settings.api_token.get_secret_value())
    return app
