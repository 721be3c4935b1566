"""Persistence behind one interface: SQLite by default, Postgres for many nodes."""

from corral.events import Event, NewEvent
from corral.store.store import Store

__all__ = ["Event", "NewEvent", "Store"]
