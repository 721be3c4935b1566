"""A bounded map that forgets the least recently used key first.

What the kernel and its services remember about recently active sessions (a conversation,
whether a session has its title) must stay bounded however many sessions there are; a miss
only costs a read from the store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def __repr__(self) -> str:
        return f"<Lru {len(self._items)}/{self.capacity}>"

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if not (or no longer) kept."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` as the most recently used, forgetting the oldest beyond capacity
        (with a capacity of 0, nothing is kept)."""
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
