"""The FastAPI application: routes, error mapping, limits, auth, the web page, and the kernel's lifespan."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from corral import __version__
from corral.api import a2a, errors, forward, openapi
from corral.api.forward import Forwarder
from corral.api.limits import Authenticate, BodyLimit
from corral.api.node_header import NodeHeader
from corral.api.request_log import LogContext
from corral.api.routes import agents, events, jobs, meta, openai, responses, runs, sessions
from corral.api.routes import channels as channel_routes
from corral.api.routes import cluster as cluster_routes
from corral.api.run_stream_shortcut import RunStreamShortcut
from corral.channels import install_channels
from corral.cluster import Membership, Node
from corral.cluster import join as join_cluster
from corral.cluster.remote import HttpRemote
from corral.kernel import Kernel
from corral.metrics import Metrics
from corral.services.reflector import ReflectorConfig, install_reflector
from corral.services.scheduler import install_scheduler
from corral.services.subagents import install_subagents
from corral.settings import Settings
from corral.store import Store, nodes
from corral.tools import default_registry

# In a cluster, how often each node's scheduler re-reads the jobs every node shares.
JOBS_RELOAD_S = 2.0
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(settings: Settings, *, store: Store | None = None) -> FastAPI:
    """The app; ``store`` replaces the one the settings name (a test's store that fails on cue).

    On Postgres the process is a node of a cluster (docs/cluster.md): it joins as the kernel
    starts, forwards writes for sessions other nodes hold, and names itself in every answer.
    """
    metrics = Metrics()
    cluster = settings.is_postgres
    node = Node(settings.resolved_advertise_url(), settings.resolved_database_url(), lease_ttl_s=settings.lease_ttl_s,
                heartbeat_s=settings.heartbeat_s, on_fenced=lambda: _stop_fenced(app)) if cluster else None
    secret = _cluster_secret(settings) if cluster else None
    forwarder = None
    if secret is not None:

        async def owner_alive(node_id: str) -> bool:
            kernel = app.state.kernel
            return bool(await kernel.store.read(nodes.is_alive, node_id, settings.lease_ttl_s))

        forwarder = Forwarder(secret, metrics, owner_alive=owner_alive, check_every_s=settings.heartbeat_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        nonlocal store
        store = store or Store(settings.resolved_database_url(), sqlite_synchronous=settings.sqlite_synchronous)
        membership = Membership(store, node, metrics) if node is not None else None
        remote = HttpRemote(secret, metrics) if secret is not None else None
        kernel = Kernel(store, settings.kernel_config(), initial_agents=settings.initial_agents(),
                        tools=default_registry(settings.tools), metrics=metrics, ownership=membership, remote=remote)
        if membership is not None:
            join_cluster(kernel, membership, settings.resolved_database_url())
        scheduler = install_scheduler(kernel, misfire_grace_s=settings.misfire_grace_s)
        if membership is not None:
            kernel.add_service("cluster-jobs", lambda: scheduler.reload_forever(JOBS_RELOAD_S))
        install_subagents(kernel, settings.subagent_limits())
        install_reflector(kernel, ReflectorConfig(settings.reflector_max_concurrent, settings.reflector_summary_every))
        # Chat channels (docs/channels.md): one supervised runtime each, the kernel's services.
        app.state.channels = install_channels(kernel, settings.channels)
        try:
            async with kernel.running():
                app.state.kernel = kernel
                app.state.scheduler = scheduler
                yield
        finally:
            for client in (forwarder, remote):
                if client is not None:
                    await client.aclose()

    app = FastAPI(title="Corral", version=__version__, lifespan=lifespan,
                  generate_unique_id_function=openapi.operation_id)
    app.state.auth_required = settings.auth_enabled
    errors.install(app)
    openapi.install(app)  # the document clients are generated from (api/openapi.py)
    if forwarder is not None:
        forward.install(app, forwarder)
    # Routes are matched in order, one regex each: the busiest (a turn's POST and its stream) go first.
    for module in (sessions, events, runs, agents, jobs, openai, responses, meta, cluster_routes, channel_routes):
        app.include_router(module.router)
    # A2A (docs/a2a.md): each agent at /a2a/{agent}, its card open to all (Authenticate).
    app.router.routes.extend(a2a.routes())

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    # Outermost last: CORS answers preflights before auth asks for a token; auth runs before
    # any route reads a body, and the body limit guards every route.
    app.add_middleware(RunStreamShortcut)  # innermost: after auth and the body limit, before the router
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, tokens=settings.token_table(), cluster_secret=secret)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "idempotency-key", "last-event-id", "x-corral-session",
                           "a2a-version", "a2a-extensions"],  # a browser's A2A client (docs/a2a.md)
            expose_headers=["x-should-retry", "retry-after", "x-corral-run-id"],
        )
    app.add_middleware(LogContext)  # outermost: a refused request logs with its session or run id too
    if node is not None:
        app.add_middleware(NodeHeader, node_id=node.id)
    return app


def _cluster_secret(settings: Settings) -> str:
    """The secret nodes mark forwarded requests with. Required beyond loopback; on loopback, one
    every node of the same database derives alike, so a forwarded request is still known."""
    if settings.cluster_secret is not None:
        return settings.cluster_secret.get_secret_value()
    return hashlib.sha256(b"corral-loopback-cluster:" + settings.resolved_database_url().encode()).hexdigest()


def _stop_fenced(app: FastAPI) -> None:
    """This node was taken over: stop taking work and exit, as on SIGTERM (a supervisor may
    start it again, as a new node)."""
    kernel = getattr(app.state, "kernel", None)
    if kernel is not None:
        kernel.begin_stop()
    os.kill(os.getpid(), signal.SIGTERM)
