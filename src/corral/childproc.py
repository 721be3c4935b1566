"""A child process group that Corral starts, watches and reaps itself.

Shared by the ``shell`` tool and ACP agents: both must be able to stop a program together
with everything it started, without trusting asyncio's child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

TERM_GRACE_S = 1.0


class ChildProcess:
    """A process started with ``start_new_session=True``, watched and reaped here, with its group.

    asyncio's child watcher on Python 3.11 can lose an exit once event loops have come and
    gone (seen in the test suite: ``wait()`` then never returns). So the process is started
    with ``subprocess.Popen``, which asyncio does not watch, and its exit is awaited through
    a pidfd on the loop.

    The leader is reaped only by ``reap()``, which first kills the rest of its group. Until
    then the leader's pid, which is the group id, stays taken (a zombie's pid is not reused),
    so a group signal can never reach an unrelated group that got the same number.
    """

    def __init__(self, process: subprocess.Popen[bytes]):
        self.process = process
        self.pid = process.pid
        self.code: int | None = None  # set by reap(); no group signal after that
        self._pidfd = os.pidfd_open(process.pid)
        self._exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def __repr__(self) -> str:
        state = "running" if not self._exited.done() else "exited" if self.code is None else f"reaped ({self.code})"
        return f"<ChildProcess pid={self.pid} {state}>"

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait_exited(self) -> None:
        await asyncio.shield(self._exited)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def reap(self) -> int:
        """Kill what is left of the group, then collect the leader's exit code (it has exited)."""
        self.signal_group(signal.SIGKILL)
        if self.code is None:
            self.code = self.process.wait()  # a zombie: this returns at once
        return self.code

    async def end(self, *, at_once: bool) -> None:
        """Stop every process of the group: SIGTERM with a grace, or SIGKILL at once; then reap."""
        if not at_once:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TERM_GRACE_S):
                    await self.wait_exited()
        self.signal_group(signal.SIGKILL)
        await self.wait_exited()
        self.reap()
