"""A package's public names, imported on first use (PEP 562 ``__getattr__``).

A package whose ``__init__`` imported every name it re-exports would make importing any
small module of it (``corral.kernel.lane``) load the whole runtime; this keeps the curated
surface and pays for a name only when someone uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: each name of ``homes`` from its module, on first use."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(home), name)

    return __getattr__
