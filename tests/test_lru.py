"""The bounded least-recently-used map behind the kernel's and the reflector's memory."""

from __future__ import annotations

from corral.lru import Lru


def test_the_least_recently_used_key_goes_first() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recently used...
    lru.put("c", 3)  # ...so "b" goes
    assert (lru.get("a"), lru.get("b"), lru.get("c"), len(lru)) == (1, None, 3, 2)
    lru.pop("a")
    lru.pop("missing")
    assert (lru.get("a"), len(lru)) == (None, 1)


def test_capacity_zero_keeps_nothing() -> None:
    lru: Lru[str, int] = Lru(0)
    lru.put("a", 1)
    assert (lru.get("a"), len(lru)) == (None, 0)
