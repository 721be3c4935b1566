"""Running the service under uvicorn with a graceful, bounded shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from corral import tracing
from corral.errors import InvalidInput
from corral.logs import configure_logging
from corral.settings import WILDCARD_HOSTS, Settings
from corral.single_process import hold_database

if TYPE_CHECKING:
    from fastapi import FastAPI


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, stop intake and end SSE streams before uvicorn drains connections."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, on_ready: Callable[[], None] | None = None):
        super().__init__(config)
        self._app = app
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        tune_garbage_collection()
        if self.started and self._on_ready is not None:
            self._on_ready()

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
    """Refuse ``workers`` > 1 on SQLite (one process per file), where the kernel cannot share the
    port, or with an ``advertise_url`` the workers' own URLs cannot be derived from (cli/workers.py)."""
    if settings.workers == 1:
        return
    refusing = f"refusing {settings.workers} workers (--workers, CORRAL_WORKERS)"
    if not settings.is_postgres:
        raise InvalidInput(
            f"{refusing}: a SQLite database is served by one process only; several workers need Postgres "
            "(--database-url postgresql+asyncpg://...)"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        raise InvalidInput(f"{refusing}: workers share the port with SO_REUSEPORT, which this system lacks; "
                           "start several `corral serve` processes on different ports instead")
    from corral.cli.workers import advertise_url_problem

    problem = advertise_url_problem(settings)
    if problem is not None:
        raise InvalidInput(f"{refusing} with this advertise_url: {problem}")


def serve(settings: Settings) -> int:
    """Serve until a signal; the exit status. With ``workers`` > 1, supervise that many worker
    processes instead (cli/workers.py), each a node serving as below."""
    check_exposure(settings)
    check_workers(settings)
    if settings.workers > 1:
        from corral.cli.workers import supervise

        return supervise(settings)
    run(settings)
    return 0


# Descriptors a node needs besides its connections: the database, tool processes' pipes, logs.
SPARE_FILES = 256


def raise_open_file_limit(max_connections: int) -> None:
    """Raise the soft limit on open files (RLIMIT_NOFILE) so that ``max_connections`` can be
    reached: often 1024 by default, below the 4096 connections allowed. Never above the hard
    limit, which only an administrator can raise; a warning says when it is too low."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    wanted = max_connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        target = soft
        logging.getLogger(__name__).warning("could not raise the open files limit from %d to %d: %s", soft,
                                            wanted, exc)
    if target < wanted:
        logging.getLogger(__name__).warning(
            "max_connections (%d) cannot be reached: this process may open %d files, and needs about %d "
            "(raise the hard limit, e.g. ulimit -Hn, or lower CORRAL_MAX_CONNECTIONS)", max_connections, target,
            wanted)


class TagLines(logging.Filter):
    """Starts every line with ``[TAG] ``: which worker of ``--workers N`` wrote it."""

    def __init__(self, tag: str):
        super().__init__()
        self.prefix = f"[{tag}] "

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: left for the handler to report as it would
            return True
        record.msg, record.args = self.prefix + message, None
        return True


def run(settings: Settings, *, sockets: list[socket.socket] | None = None,
        on_ready: Callable[[], None] | None = None, log_tag: str | None = None) -> None:
    """One node (or the only process) until a signal: on ``settings.host:port``, or on ``sockets``
    (a worker's, handed over by its supervisor), calling ``on_ready`` once it serves."""
    # Held until the process ends, however it ends; None on Postgres (single_process.py).
    database_lock = hold_database(settings.resolved_database_url())
    handler = configure_logging(settings.log_level, settings.log_format)
    if log_tag is not None:
        handler.addFilter(TagLines(log_tag))
    tracing.configure(settings.otel)
    from corral.api import create_app  # here: a --workers supervisor loads none of the server
    from corral.api.http_protocol import ClientLimits, guarded_protocol

    app = create_app(settings)
    freeze_loaded_modules()
    raise_open_file_limit(settings.max_connections)
    limits = ClientLimits(settings.header_timeout_s, settings.body_timeout_s, settings.keep_alive_timeout_s,
                          settings.max_connections)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through configure_logging's handler
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    _Server(config, app, on_ready).run(sockets=sockets)
    if database_lock is not None:
        database_lock.release()
