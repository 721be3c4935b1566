"""The one place errors become HTTP responses: ``{"error": {"code", "message"}}``.

An error answering a request that already created a run also says whether to retry it
(``x-should-retry``, see ``corral.api.retry_advice``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from corral import errors as e
from corral.api.retry_advice import advice_headers

STATUS: list[tuple[type[e.CorralError], int]] = [
    (e.InvalidInput, 400),
    (e.Unauthorized, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.BodyTooLarge, 413),
    (e.TooManyPending, 429),
    (e.ShuttingDown, 503),
    (e.StoreUnavailable, 503),
]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def status_for(exc: e.CorralError) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


# The OpenAI error ``type`` for each status, so OpenAI clients classify Corral's errors too.
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


async def _corral_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.CorralError)
    status = status_for(exc)
    body = error_body(exc.code, str(exc), type=OPENAI_TYPES.get(status, "server_error"))
    headers = advice_headers(request)
    if isinstance(exc, e.StoreUnavailable):
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = list(exc.errors())
    if any(p.get("type") == "json_invalid" for p in problems):
        body = error_body("malformed_json", "the request body is not valid JSON", type=OPENAI_TYPES[400])
        return JSONResponse(body, status_code=400)
    details = [
        {"loc": [str(part) for part in p.get("loc", ())], "message": str(p.get("msg", ""))} for p in problems
    ]
    summary = "; ".join(f"{'.'.join(d['loc'])}: {d['message']}" for d in details)
    return JSONResponse(error_body("invalid_input", summary, type=OPENAI_TYPES[422], details=details), status_code=422)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # A body json_body.py refused carries its own code.
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail), type=OPENAI_TYPES.get(exc.status_code, "invalid_request_error"))
    headers = {**advice_headers(request), **(exc.headers or {})}
    if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
        headers = {name: value for name, value in headers.items() if name.lower() != "allow"}
        headers["allow"] = _allowed_methods(request)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path (``PUT /v1/agents`` is told GET and POST)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the caller's fault; uvicorn still logs the traceback (Starlette re-raises after this).
    body = error_body("internal", "internal server error", type="server_error")
    return JSONResponse(body, status_code=500, headers=advice_headers(request))


def install(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(e.CorralError, _corral_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
