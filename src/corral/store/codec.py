"""How JSON columns are written and read: the engines' ``json_serializer``/``json_deserializer``.

Postgres refuses ``\\u0000`` in JSON and no backend can hold a lone surrogate, so a value
holding either is written with them replaced (``corral.text``), on both backends alike. The
check is on the encoded text, which is ASCII, so the common case costs one substring search;
the rare hit (or a character outside the Basic Multilingual Plane, encoded as a surrogate
pair) walks the value. Reading applies the same rule, so a row written before it existed
cannot break a listing either.
"""

from __future__ import annotations

import json
from typing import Any

from corral.text import clean_json


def _suspect(text: str) -> bool:
    return "\\u0000" in text or "\\ud" in text


def dumps(value: Any) -> str:
    text = json.dumps(value)
    return json.dumps(clean_json(value)) if _suspect(text) else text


def loads(text: str | bytes) -> Any:
    value = json.loads(text)
    if _suspect(text if isinstance(text, str) else text.decode("utf-8", "replace")):
        return clean_json(value)
    return value
