"""The FastAPI application: routes, error mapping, limits, auth, the web page, and the kernel's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from corral import __version__
from corral.api import errors
from corral.api.limits import Authenticate, BodyLimit
from corral.api.request_log import LogContext
from corral.api.routes import agents, events, jobs, meta, openai, runs, sessions
from corral.kernel import Kernel
from corral.services.reflector import ReflectorConfig, install_reflector
from corral.services.scheduler import install_scheduler
from corral.services.subagents import install_subagents
from corral.settings import Settings
from corral.store import Store
from corral.tools import default_registry

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(settings: Settings, *, store: Store | None = None) -> FastAPI:
    """The app; ``store`` replaces the one the settings name (a test's store that fails on cue)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        nonlocal store
        store = store or Store(settings.resolved_database_url(), sqlite_synchronous=settings.sqlite_synchronous)
        kernel = Kernel(store, settings.kernel_config(), initial_agents=settings.initial_agents(),
                        tools=default_registry(settings.tools))
        scheduler = install_scheduler(kernel, misfire_grace_s=settings.misfire_grace_s)
        install_subagents(kernel, settings.subagent_limits())
        install_reflector(kernel, ReflectorConfig(settings.reflector_max_concurrent, settings.reflector_summary_every))
        async with kernel.running():
            app.state.kernel = kernel
            app.state.scheduler = scheduler
            yield

    app = FastAPI(title="Corral", version=__version__, lifespan=lifespan)
    app.state.auth_required = settings.auth_enabled
    errors.install(app)
    # Routes are matched in order, one regex each: the busiest (a turn's POST and its stream) go first.
    for module in (sessions, events, runs, agents, jobs, openai, meta):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    # Outermost last: CORS answers preflights before auth asks for a token; auth runs before
    # any route reads a body, and the body limit guards every route.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, tokens=settings.token_table())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "idempotency-key", "last-event-id", "x-corral-session"],
        )
    app.add_middleware(LogContext)  # outermost: a refused request logs with its session or run id too
    return app
