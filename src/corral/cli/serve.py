"""Running the service under uvicorn with a graceful, bounded shutdown."""

from __future__ import annotations

import asyncio
import gc
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from corral import tracing
from corral.api import create_app
from corral.errors import InvalidInput
from corral.logs import configure_logging
from corral.settings import WILDCARD_HOSTS, Settings
from corral.single_process import hold_database


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, stop intake and end SSE streams before uvicorn drains connections."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        tune_garbage_collection()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        kernel = getattr(self._app.state, "kernel", None)
        if kernel is not None:
            kernel.begin_stop()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        reaper = asyncio.create_task(self._abort_unflushable())
        try:
            await super().shutdown(sockets)
        finally:
            reaper.cancel()
        await tracing.flush()  # the runs have ended; uvicorn then re-raises the signal, skipping atexit

    async def _abort_unflushable(self) -> None:
        """Drop connections that are closing but cannot flush: an observer that stopped reading.

        Its stream is already over (``begin_stop``), but ``transport.close()`` waits for the
        peer to read the buffered bytes, so without this uvicorn's drain would sit out all of
        ``timeout_graceful_shutdown`` for a client that will never read them. A closing
        connection whose buffer still shrinks (a slow but reading client) is left to finish.
        """
        last: dict[asyncio.Transport, int] = {}
        while True:
            await asyncio.sleep(0.1)
            seen: dict[asyncio.Transport, int] = {}
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if not isinstance(transport, asyncio.Transport) or not transport.is_closing():
                    continue
                pending = transport.get_write_buffer_size()
                if pending and pending >= last.get(transport, pending + 1):
                    transport.abort()  # no progress since the last look
                else:
                    seen[transport] = pending
            last = seen


# Young collections at most every this many new container objects (CPython's default: 700).
YOUNG_GC_THRESHOLD = 50_000


def tune_garbage_collection() -> None:
    """Keep the cyclic collector off what lives as long as the server, once it has started.

    Modules, the app, the kernel and the store are some 200,000 objects that never become
    garbage, and every full collection walked them all: under the throughput benchmark's
    load that was pauses of up to 270 ms with the event loop stopped, and about a tenth of
    the server's time (docs/benchmarks.md). Frozen, the collector skips them; and with young
    collections rarer, fewer short-lived objects survive one into the older generations,
    which is what makes full collections come at all. Refcounting still frees everything
    that is not in a cycle at once, so memory is not what this trades.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def freeze_loaded_modules() -> None:
    """Collect, freeze and turn the cyclic collector back on once the server's code is loaded.

    ``corral serve`` turns the collector off before it imports the server: the imports create
    most of the objects that live as long as the process, and full collections walked them
    over and over while they loaded (a sixth of the start-up). One collection here frees the
    little garbage the imports left; frozen, the rest is not walked again, not even by
    ``tune_garbage_collection`` once the server has started, and the kernel and the store
    start with the collector on, as they always did.
    """
    gc.collect()
    gc.freeze()
    gc.enable()


def check_exposure(settings: Settings) -> None:
    """Refuse a bind beyond loopback that would let anyone in: without an API token, or, on
    Postgres (where other nodes call this one), without the cluster secret or with no address
    another machine can reach this node at."""
    if settings.is_loopback:
        return
    if not settings.auth_enabled:
        raise InvalidInput(
            f"refusing to bind {settings.host}: binding beyond loopback requires an API token "
            "(set CORRAL_API_TOKEN, or api_token or [[principals]] in corral.toml)"
        )
    if not settings.is_postgres:
        return
    if settings.cluster_secret is None:
        raise InvalidInput(
            f"refusing to bind {settings.host} on Postgres: binding beyond loopback requires a cluster secret "
            "for node-to-node calls (set CORRAL_CLUSTER_SECRET, or cluster_secret in corral.toml; "
            "the same secret on every node)"
        )
    if settings.advertise_url is None and settings.host in WILDCARD_HOSTS:
        raise InvalidInput(
            f"refusing to bind {settings.host} on Postgres without an advertised URL: other nodes cannot reach "
            f"http://{settings.host}:{settings.port} (set --advertise-url, CORRAL_ADVERTISE_URL or advertise_url "
            "to this node's address, e.g. http://10.0.0.5:8787)"
        )


def check_workers(settings: Settings) -> None:
    """Refuse ``workers`` > 1, which nothing starts yet; SQLite never will (one process per file)."""
    if settings.workers == 1:
        return
    if not settings.is_postgres:
        raise InvalidInput(
            f"refusing {settings.workers} workers (--workers, CORRAL_WORKERS): a SQLite database is served by "
            "one process only; several workers need Postgres (--database-url postgresql+asyncpg://...)"
        )
    raise InvalidInput(
        f"refusing {settings.workers} workers (--workers, CORRAL_WORKERS): several workers on one machine are "
        "not available yet; start several `corral serve` processes on different ports (the same "
        "--database-url, each with its own --port and --advertise-url) instead"
    )


def serve(settings: Settings) -> None:
    check_exposure(settings)
    check_workers(settings)
    # Held until the process ends, however it ends; None on Postgres (single_process.py).
    database_lock = hold_database(settings.resolved_database_url())
    configure_logging(settings.log_level, settings.log_format)
    tracing.configure(settings.otel)
    app = create_app(settings)
    freeze_loaded_modules()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through configure_logging's handler
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    _Server(config, app).run()
    if database_lock is not None:
        database_lock.release()
