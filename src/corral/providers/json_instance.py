"""The smallest JSON value a JSON schema accepts, as the demo model answers a structured-output request.

Only the demo model uses it (a test double: a client asking for JSON gets JSON it can parse and
validate). It covers what clients send in practice, pydantic's and zod's schemas included:
``type`` (or a list of types), ``properties``/``required``, ``items``/``minItems``,
``prefixItems``, ``enum``, ``const``, ``minimum``/``exclusiveMinimum``, ``multipleOf``,
``minLength``, ``anyOf``/``oneOf``/``allOf``, and ``$ref`` into ``$defs``/``definitions``.
Keys a schema may carry beyond those are ignored; a schema it cannot satisfy gets its best try.
"""

from __future__ import annotations

import math
from typing import Any

# A recursive schema ($ref to itself) is cut off at this depth with the smallest value of its type.
MAX_DEPTH = 32


def minimal_instance(schema: dict[str, Any]) -> Any:
    """The smallest value ``schema`` accepts: required properties only, empty strings, zeros
    (or the minimum), false, the first ``enum`` value, ``minItems`` items."""
    return _Instance(schema).value(schema, 0)


class _Instance:
    def __init__(self, root: dict[str, Any]):
        self._root = root

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict):
            return None  # `true` (anything goes) or a malformed schema: null is the smallest value
        if depth > MAX_DEPTH:
            return _smallest_of(_first_type(schema))
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                # An optional field is anyOf [X, null]: X says more than null does.
                chosen = next((b for b in branches if not _is_null(b)), branches[0])
                return self.value(chosen, depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.value(merged, depth + 1)
        kind = _first_type(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return "x" * int(schema.get("minLength", 0))
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        return _smallest_of(kind)

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        return {name: self.value(properties.get(name, {}), depth + 1) for name in schema.get("required") or ()}

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        count = int(schema.get("minItems", 0))
        items: list[Any] = [self.value(p, depth + 1) for p in prefix[:count]]
        while len(items) < count:
            items.append(self.value(schema.get("items", {}), depth + 1))
        return items

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node: Any = self._root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}


def _first_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "null"


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _smallest_of(kind: str) -> Any:
    return {"object": {}, "array": [], "string": "", "integer": 0, "number": 0, "boolean": False}.get(kind)


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    low: float = 0
    if isinstance(schema.get("minimum"), int | float):
        low = schema["minimum"]
    elif isinstance(schema.get("exclusiveMinimum"), int | float):
        low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    elif isinstance(schema.get("maximum"), int | float) and schema["maximum"] < 0:
        low = schema["maximum"]
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and step > 0:
        low = math.ceil(low / step) * step
    if integer:
        return math.ceil(low)
    return int(low) if float(low).is_integer() else low


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    if "properties" in base or "properties" in extra:
        merged["properties"] = {**(base.get("properties") or {}), **(extra.get("properties") or {})}
    if "required" in base or "required" in extra:
        merged["required"] = list(dict.fromkeys([*(base.get("required") or ()), *(extra.get("required") or ())]))
    return merged
