"""The concurrency core: lanes, runs, sessions, agents and events. No HTTP, no SQL.

The names below load on first use, so importing a pure module of the package
(``corral.kernel.lane``) does not import the whole runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.lazy import lazy_attributes

if TYPE_CHECKING:
    from corral.kernel.config import KernelConfig
    from corral.kernel.kernel import Kernel
    from corral.kernel.sessions import Accepted

__all__ = ["Accepted", "Kernel", "KernelConfig"]

_HOMES = {
    "Accepted": "corral.kernel.sessions",
    "Kernel": "corral.kernel.kernel",
    "KernelConfig": "corral.kernel.config",
}


__getattr__ = lazy_attributes(__name__, _HOMES)
