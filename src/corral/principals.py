"""Who is calling: API tokens map to principals, and a principal owns its sessions.

Without any configured token the service is a single-user loopback tool and every
caller is the ``local`` principal with admin rights. Once tokens exist, every API
request must carry one; a non-admin principal sees only the sessions it created.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from corral.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    admin: bool = False

    def may_access(self, owner: str) -> bool:
        return self.admin or owner == self.name


LOCAL = Principal("local", admin=True)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Looks a bearer token up by its SHA-256 digest.

    Comparing digests in a dict leaks, through timing, at most which digest prefix
    matched, never the token; and the table holds no token in clear.
    """

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()):
        self._by_digest: dict[bytes, Principal] = {}
        for token, principal in entries:
            digest = _digest(token)
            if digest in self._by_digest:
                raise InvalidInput(f"two principals share one API token ({principal.name!r})")
            self._by_digest[digest] = principal

    def __repr__(self) -> str:
        return f"<TokenTable tokens={len(self._by_digest)}>"

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))
