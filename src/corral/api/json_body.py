"""Request bodies, parsed by one set of rules for every route before any of them sees a value.

What a JSON parser accepts is wider than what Corral can keep: Python's parser takes ``NaN``
and ``1e999`` (which no response can carry back), nests until the interpreter's recursion
limit (a ``RecursionError``, not a parse error), and decodes ``\\ud800`` into a lone
surrogate that no UTF-8 writer accepts. Each of those, let through, was stored and then broke
every listing that held it. Here a body is refused before anything is written:

- not UTF-8, not JSON, or a non-finite number: 400 ``malformed_json``;
- nested deeper than ``MAX_DEPTH``, or holding a lone surrogate: 422 ``invalid_input``.

A NUL (U+0000) is valid text that Postgres alone refuses, so it is accepted and replaced by
U+FFFD here, as everywhere text enters Corral (``corral/text.py``): both backends then keep the
same message. Routes get this through ``CheckedRoute``, the route class of every router.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from corral.text import clean, has_lone_surrogate

# Deep enough for any real request (an OpenAI tool's JSON schema nests a dozen levels).
MAX_DEPTH = 64


class UnusableBody(HTTPException):
    """A body refused before any route saw it; ``code`` is the error code clients get."""

    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(status_code=status_code, detail=message)
        self.code = code


def _malformed(message: str) -> UnusableBody:
    return UnusableBody(400, "malformed_json", f"the request body is not valid JSON: {message}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse(raw: bytes) -> Any:
    """The body's JSON value, checked and with NULs replaced; raises ``UnusableBody``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"it is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, a non-finite number, an integer over Python's digit limit
        raise _malformed(str(exc)) from None
    return _checked(value, "$", 0)


def _too_deep() -> UnusableBody:
    return UnusableBody(422, "invalid_input", f"the request body nests deeper than {MAX_DEPTH} levels")


def _text(value: str, where: str) -> str:
    if has_lone_surrogate(value):
        raise UnusableBody(422, "invalid_input", f"{where}: the text holds a lone surrogate (not encodable as UTF-8)")
    return clean(value)


def _checked(value: Any, where: str, depth: int) -> Any:
    if isinstance(value, str):
        return _text(value, where)
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, list):
            return [_checked(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
        checked = {}
        for key, item in value.items():
            key = _text(key, where)
            checked[key] = _checked(item, f"{where}.{key[:40]}", depth + 1)
        return checked
    return value


class CheckedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse(await self.body())
        return self._json


class CheckedRoute(APIRoute):
    """Hands every endpoint (and FastAPI's own body parsing) a ``CheckedRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            checking = CheckedRequest(request.scope, request.receive)
            try:
                return await handler(checking)
            finally:
                # An exception handler gets the original request: one that forwards the request
                # to the session's owner (api/forward.py) sends the body read here.
                if hasattr(checking, "_body"):
                    request._body = checking._body

        return checked
