"""One ``corral serve`` per SQLite database file.

Why: a SQLite database is served by exactly one process. Each process believes it owns every
session in the file: a second one's start-up recovery would mark the first one's live runs
interrupted and run their inputs again, and both would hand out the same session's event
sequence numbers. Nothing in the file itself can stop that, so a second process on the same
file is refused before the app starts (several processes on one database are what Postgres
and the cluster are for).

How: an exclusive, non-blocking ``flock`` on a lock file next to the database
(``<db path>.lock``), held as long as the process lives. The operating system releases a
``flock`` when the last descriptor of its open file is closed, which process death does, however
it dies: ``kill -9`` leaves nothing stale to clean up, and the file that remains is harmless (it
is the lock, not the file's existence, that counts; the file is never deleted, since deleting it
would let a third process lock a new file while the second still holds the old one). The
holder's pid is written into the file so that the refusal can name it. The descriptor is not
inherited by child processes (Python's default, PEP 446), so a tool's long-lived child cannot
keep a dead server's database locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from corral.errors import Conflict, InvalidInput


class DatabaseInUse(Conflict):
    """Another process already serves this SQLite database."""

    code = "database_in_use"


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///...`` URL opens, resolved (symlinks too); None for any other database."""
    from sqlalchemy.engine import make_url  # the store's own reading of the URL, so both name one file

    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with no stable subclass
        raise InvalidInput(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    database = parsed.database
    if database.startswith("file:"):  # a URI filename (``?uri=true``): file:path or file:///path
        database = database.removeprefix("file:").split("?", 1)[0]
        if database.startswith("//"):
            database = "/" + database.lstrip("/")
    return Path(database).resolve()


class DatabaseLock:
    """The exclusive lock on one SQLite database, held until ``release`` or the process's end."""

    def __init__(self, database: Path):
        self.database = database
        self.path = database.with_name(database.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not O_TRUNC: a refused process must not wipe the holder's pid.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            pid = f" (pid {holder})" if holder is not None else ""
            raise DatabaseInUse(
                f"another Corral process{pid} is serving the SQLite database {database} (lock file {self.path}); "
                "a SQLite database is served by one process only: stop that one first, or use another "
                "--data-dir (several processes on one database need Postgres)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds without the pid, which only names the holder in a refusal
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (closing the descriptor does it); the file stays, see the module's docstring."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote, or None while it has not written it yet (or wrote something else)."""
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except ValueError:
        return None


def hold_database(url: str) -> DatabaseLock | None:
    """Lock the SQLite database ``url`` names for this process, or raise ``DatabaseInUse``;
    None (nothing to hold) for Postgres, which several processes share by design."""
    database = sqlite_path(url)
    return DatabaseLock(database) if database is not None else None
