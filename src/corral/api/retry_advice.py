"""``x-should-retry``: whether a client should send a request again, once the request created a run.

OpenAI's SDKs (and every client Stainless generates) retry 408, 409, 429, any 5xx, a timeout
and a dropped connection, twice by default, unless the answer says ``x-should-retry: false``
(``true`` makes them retry whatever the status). Without advice a failed run's 502 or a
stopped run's 409 would start the same work twice more: Stop undone, a tool's side effects
tripled. Before a run exists nothing needs saying: a 503 for an unwritable store, say,
accepted nothing, and the client's own rules (retry a 503) are right.

A route calls :func:`advise` the moment it has created (or found) the run; from then on
every answer to the request carries the advice: the route's own answers through
:func:`advice_headers`, and the error handlers' (``corral.api.errors``) through the same
function, since the advice lives in the request's scope.
"""

from __future__ import annotations

from enum import Enum

from starlette.requests import Request

HEADER = "x-should-retry"
_STATE_KEY = "retry_advice"


class RetryAdvice(Enum):
    """What a retry of a request that created a run would do, as the header's value."""

    # The answer is the run's outcome, or a retry would start another run (no Idempotency-Key):
    # the client should not retry.
    DONT = "false"
    # A retry attaches to the same run (the request carried an Idempotency-Key) and this answer
    # is not its outcome (a store that failed a read, a server stopping): retrying gets it.
    RETRY = "true"


def for_key(idempotency_key: str | None) -> RetryAdvice:
    """The advice for an answer that is not the run's outcome: retry only if the retry finds the run."""
    return RetryAdvice.DONT if idempotency_key is None else RetryAdvice.RETRY


def advise(request: Request, advice: RetryAdvice) -> None:
    """From now on every answer to ``request`` (an error's included) carries ``advice``."""
    setattr(request.state, _STATE_KEY, advice)


def advice_headers(request: Request) -> dict[str, str]:
    """The header for an answer to ``request``: none before :func:`advise` was called."""
    advice: RetryAdvice | None = getattr(request.state, _STATE_KEY, None)
    return {} if advice is None else {HEADER: advice.value}


def outcome_headers() -> dict[str, str]:
    """The header for an answer that is the run's outcome: retrying it gains nothing."""
    return {HEADER: RetryAdvice.DONT.value}
