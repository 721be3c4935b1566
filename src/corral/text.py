"""Text every part of Corral can keep, send and store alike.

Two kinds of character break things far from where they enter. U+0000 is refused by
Postgres in text and JSON columns (SQLite keeps it), so the same message would be stored on
one backend and fail on the other. A lone surrogate (U+D800-U+DFFF unpaired, which JSON's
``\\ud800`` escape and a tool's undecodable bytes both produce) cannot be encoded as UTF-8
at all, so any response or row holding one fails long after it was accepted. Text that a
run produces (a model, a tool, an MCP server, an ACP program) has both replaced by U+FFFD as
it enters the run, and the store does the same for anything else, so what is shown live and
what is read back later agree on both backends.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(text: str) -> str:
    """``text`` with NULs and lone surrogates replaced by U+FFFD (the same object if none)."""
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) is not None else text


def clean_json(value: Any) -> Any:
    """A JSON value with every string in it, keys included, passed through ``clean``."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(item) for item in value]
    return value


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None
