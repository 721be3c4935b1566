"""``corral serve --workers N`` on Postgres: a supervisor and N node processes sharing one port.

Why processes: one Corral process uses one core (its lanes, its store's writer and its HTTP
server share one event loop). On Postgres, processes on one database form a cluster
(docs/cluster.md), so N of them on one machine use N cores with nothing new to coordinate:
each worker is a node like any other, with its own id, lease and sessions.

How:

- The supervisor (the process the user started) serves no request and opens no database. It
  checks once that HOST:PORT can be bound and is free, then starts each worker as
  ``python -m corral serve`` with ``_CORRAL_WORKER`` (internal, not a setting) in its
  environment, and hands it three descriptors:

  - the public socket, HOST:PORT with ``SO_REUSEPORT``, one per worker: the kernel spreads
    incoming connections over the workers' sockets (by a hash of each connection's addresses);
  - a private socket on HOST and a port the operating system picks, which only this worker
    listens on. It is the worker's advertised URL (``http://HOST:<that port>``, or the host of
    ``advertise_url`` with that port): a write for a session another node owns is forwarded to
    that node, so each node must be reachable by itself, not only through the shared port;
  - its end of a socketpair, the control channel: the supervisor sends the settings, resolved
    once from flags, environment and file, with ``advertise_url`` and ``workers`` made the
    worker's own; the worker answers ``ready`` once it serves. When the supervisor is gone,
    however it went (even ``kill -9``), the worker reads the end of the channel and stops as
    on SIGTERM: no worker outlives its supervisor.

  The supervisor keeps no copy of the sockets once a worker has them, so a worker that dies
  takes its public socket with it and new connections go to the other workers meanwhile.
- Signals: workers run in process groups of their own, so Ctrl-C in a terminal reaches the
  supervisor only, and it passes each SIGTERM or SIGINT on to every worker once: each worker
  does what one ``corral serve`` does with it, a second Ctrl-C included. After the first, the
  supervisor waits for them at most ``shutdown_grace_s`` + ``STOP_MARGIN_S``, then kills what is
  left and exits 1 (0 when they all stopped).
- A worker that exits unexpectedly after it has served (a crash, the OOM killer, a node fenced
  after losing its lease) is started again, as a new node, after a back-off that doubles from
  ``FIRST_BACKOFF_S`` to ``MAX_BACKOFF_S`` (and starts over once a worker has run for
  ``STABLE_S``); the other workers go on serving, and the dead node's sessions move as any
  dead node's do. At start, a worker that exits before it serves stops everything, exit
  status 1: a configuration or a database that fails one worker would only fail it again.
- Logs: each worker's lines start with ``[worker I]``; the supervisor's own come from
  ``corral.cli.workers``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from enum import Enum
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretBytes, SecretStr

from corral.errors import Conflict
from corral.logs import configure_logging
from corral.settings import Settings

log = logging.getLogger(__name__)

WORKER_ENV = "_CORRAL_WORKER"  # "INDEX CONTROL_FD PUBLIC_FD PRIVATE_FD", set by the supervisor only
BACKLOG = 2048  # uvicorn's default
STOP_MARGIN_S = 10.0  # beyond shutdown_grace_s: uvicorn's 2 s drain of connections, and the exit itself
KILL_WAIT_S = 5.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0
READY = b"ready\n"


class CannotListen(Conflict):
    """The shared port cannot be bound: in use, not permitted, or not an address of this machine."""

    code = "cannot_listen"


# --- sockets and addresses ----------------------------------------------------------------


def listener(host: str, port: int, *, shared: bool, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds one (IPv6 when the host has a colon),
    listening; ``shared`` sets ``SO_REUSEPORT``, so that other shared sockets of this user may
    bind the same port and the kernel spreads connections over them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int) -> int:
    """Check that ``host:port`` can be bound and that nothing listens there: the port the workers
    then share (the one the operating system picked, for port 0).

    The probe does not set ``SO_REUSEPORT``, so it fails while anyone listens on the port, even
    another ``--workers`` supervisor's workers (whose shared sockets would otherwise let this
    one's join them silently)."""
    try:
        with listener(host, port, shared=False, listen=False) as probe:
            return int(probe.getsockname()[1])
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def worker_url(settings: Settings, private: socket.socket) -> str:
    """The URL a worker advertises: its private socket's port, at the host of ``advertise_url``
    when one is set (the address other machines reach this one at), else the address it bound."""
    address, port = private.getsockname()[:2]
    host = urlsplit(settings.advertise_url).hostname if settings.advertise_url is not None else None
    host = host or address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def advertise_url_problem(settings: Settings) -> str | None:
    """Why ``advertise_url`` cannot name the workers of this machine, or None."""
    if settings.advertise_url is None:
        return None
    parts = urlsplit(settings.advertise_url)
    if parts.scheme != "http" or parts.path.strip("/") or parts.query or parts.fragment or not parts.hostname:
        return (f"each worker advertises its own port at the host of advertise_url (http://HOST:<its port>), so "
                f"advertise_url must be http://HOST or http://HOST:PORT, not {settings.advertise_url!r} "
                "(TLS or a path belongs to a proxy in front of the shared port)")
    return None


# --- the settings a worker gets ---------------------------------------------------------------


def settings_blob(settings: Settings, **changes: Any) -> bytes:
    """``settings`` (with ``changes``) as one line of JSON, secrets included: it travels over the
    control channel, a socketpair only the worker holds, never a command line or environment."""
    data = settings.model_dump()
    data.update(changes)
    return json.dumps(data, default=_plain, separators=(",", ":")).encode() + b"\n"


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        secret = value.get_secret_value()
        return secret.decode() if isinstance(secret, bytes) else secret
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot pass a {type(value).__name__} to a worker")


def settings_from_blob(blob: bytes) -> Settings:
    """The worker's settings, exactly as sent: validated again, with no environment or file read."""
    return Settings.model_validate_json(blob)


# --- the supervisor -----------------------------------------------------------------------


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM or SIGINT; the exit status."""
    import gc

    gc.enable()  # `corral serve` turned it off for the server's imports, which the supervisor does not make
    configure_logging(settings.log_level, settings.log_format)
    port = claim_port(settings.host, settings.port)
    return asyncio.run(Supervisor(settings, port).run())


def describe(returncode: int | None) -> str:
    if returncode is None:
        return "no process"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"status {returncode}"


class Worker:
    """One of the N places: its current process (a new one after each restart) and control channel."""

    def __init__(self, index: int):
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.served = False  # ready at least once
        self.failures = 0  # unexpected exits in a row
        self.started_at = 0.0

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={self.pid} {self.url}>"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL to the worker's process group: the worker and whatever its tools started."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def until_ready(self) -> bool:
        """True once the worker says it serves; False if its channel ends first (it exited)."""
        assert self.reader is not None
        try:
            return await self.reader.readline() == READY
        except OSError:
            return False

    def close_channel(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Supervisor:
    def __init__(self, settings: Settings, port: int):
        self.settings = settings
        self.port = port
        self.workers = [Worker(index) for index in range(1, settings.workers + 1)]
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self.stop_within = settings.shutdown_grace_s + STOP_MARGIN_S

    @property
    def public_url(self) -> str:
        host = self.settings.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks = [asyncio.create_task(self._keep(worker), name=f"worker-{worker.index}") for worker in self.workers]
        for task in tasks:
            task.add_done_callback(self._task_ended)
        try:
            await self.stop_requested.wait()
            _, pending = await asyncio.wait(tasks, timeout=self.stop_within)
            if pending:
                left = [worker for worker in self.workers if worker.running]
                log.error("%d worker(s) still running %.0f s after the stop (%s): killing them", len(left),
                          self.stop_within, ", ".join(f"worker {w.index} pid {w.pid}" for w in left))
                for worker in left:
                    worker.kill()
                await asyncio.wait(pending, timeout=KILL_WAIT_S)
                self.exit_code = 1
            return self.exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for worker in self.workers:
                worker.close_channel()

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", sig.name, len(self.workers))
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        """Pass ``sig`` on to every running worker (a worker started later gets SIGTERM at once)."""
        self.stopping = True
        self.stop_requested.set()
        for worker in self.workers:
            worker.signal(sig)

    def _fail(self, message: str) -> None:
        log.error("%s; stopping the other workers", message)
        self.exit_code = 1
        self._stop(signal.SIGTERM)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self.stopping:
            error = task.exception()
            log.error("supervising %s failed", task.get_name(), exc_info=error)
            self._fail(f"supervising {task.get_name()} failed: {error!r}")

    async def _keep(self, worker: Worker) -> None:
        """Run one worker until the stop, starting it again (after a back-off) when it dies."""
        while not self.stopping:
            try:
                await self._start(worker)
            except OSError as exc:  # the port taken meanwhile, out of descriptors: it never started
                log.error("worker %d could not start: %s", worker.index, exc)
                returncode = None
            else:
                if await worker.until_ready():
                    self._ready(worker)
                assert worker.proc is not None
                returncode = await worker.proc.wait()
                worker.close_channel()
            if self.stopping:
                return
            if not worker.served:  # at start: whatever failed it would fail it again
                self._fail(f"worker {worker.index} could not start" if returncode is None else
                           f"worker {worker.index} exited with {describe(returncode)} before it served "
                           "(its own lines above say why)")
                return
            ran = time.monotonic() - worker.started_at
            worker.failures = 1 if ran >= STABLE_S else worker.failures + 1
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (worker.failures - 1))
            log.error("worker %d (pid %s, node %s) exited unexpectedly with %s after %.1f s; starting it again "
                      "in %.1f s", worker.index, worker.pid, worker.url, describe(returncode), ran, delay)
            try:
                await asyncio.wait_for(self.stop_requested.wait(), delay)
            except TimeoutError:
                pass

    async def _start(self, worker: Worker) -> None:
        """A new process for ``worker``: its sockets, its channel, its settings."""
        host = self.settings.host
        ours, theirs = socket.socketpair()
        try:
            with listener(host, self.port, shared=True) as public, listener(host, 0, shared=False) as private:
                worker.url = worker_url(self.settings, private)
                fds = (theirs.fileno(), public.fileno(), private.fileno())
                worker.started_at = time.monotonic()
                worker.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "corral", "serve",
                    env={**os.environ, WORKER_ENV: " ".join(str(n) for n in (worker.index, *fds))},
                    pass_fds=fds, stdin=asyncio.subprocess.DEVNULL,
                    process_group=0,  # Ctrl-C at a terminal reaches the supervisor, which passes it on once
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its copies now; so do the `with` blocks for the listeners
        if self.stopping:
            worker.signal(signal.SIGTERM)
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        blob = settings_blob(self.settings, port=self.port, advertise_url=worker.url, workers=1)
        try:
            worker.writer.write(blob)
            await worker.writer.drain()
        except OSError:
            pass  # it died already: its exit is what the caller sees next

    def _ready(self, worker: Worker) -> None:
        first = not any(w.served for w in self.workers)
        worker.served = True
        log.info("worker %d ready: pid %s, node %s", worker.index, worker.pid, worker.url)
        if first:
            log.info("serving %s with %d workers (Press CTRL+C to quit)", self.public_url, len(self.workers))


# --- a worker ---------------------------------------------------------------------------------


def run_worker(value: str) -> None:
    """This process is worker ``INDEX`` of a supervisor (``value`` is ``_CORRAL_WORKER``): serve on
    the sockets it handed over, with the settings it sends, until a signal or the supervisor's end."""
    index, control_fd, *fds = (int(part) for part in value.split())
    control = socket.socket(fileno=control_fd)
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in (control, *sockets):
        sock.set_inheritable(False)  # no tool's process gets them (subprocess closes them anyway)
    settings = settings_from_blob(_read_line(control))
    threading.Thread(target=_stop_with_supervisor, args=(control,), name="supervisor-watch", daemon=True).start()

    def ready() -> None:
        try:
            control.sendall(READY)
        except OSError:
            pass  # the supervisor is gone: the watch thread stops this worker

    from corral.cli.serve import run

    run(settings, sockets=sockets, on_ready=ready, log_tag=f"worker {index}")


def _read_line(control: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = control.recv(65536)
        if not chunk:
            raise SystemExit("corral serve: the supervisor went away before it sent this worker's settings")
        chunks.append(chunk)
    return b"".join(chunks)


def _stop_with_supervisor(control: socket.socket) -> None:
    """Block until the control channel ends (the supervisor exited or died), then stop as on SIGTERM."""
    try:
        while control.recv(4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
