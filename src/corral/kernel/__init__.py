"""The concurrency core: lanes, runs, sessions, agents and events. No HTTP, no SQL."""

from corral.kernel.kernel import Kernel, KernelConfig
from corral.kernel.sessions import Accepted

__all__ = ["Accepted", "Kernel", "KernelConfig"]
