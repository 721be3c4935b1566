"""One error hierarchy, grouped by what the caller does next.

The API maps each class to an HTTP status once (``corral.api.errors``); nothing
classifies an error by its message text.
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error Corral raises on purpose."""

    code = "internal"


class InvalidInput(CorralError):
    """The request is malformed or names something impossible: fix it and retry."""

    code = "invalid_input"


class NotFound(CorralError):
    """The named agent, session, run or approval does not exist (or is not yours)."""

    code = "not_found"


class ModelNotFound(NotFound):
    """The OpenAI-compatible endpoint was asked for a model (agent) that does not exist."""

    code = "model_not_found"


class Conflict(CorralError):
    """The request clashes with current state: an existing name, a busy session."""

    code = "conflict"


class SessionBusy(Conflict):
    """A ``reject``-mode message arrived while the session had work."""

    code = "session_busy"


class TooManyPending(CorralError):
    """The session already holds ``max_pending_inputs`` waiting inputs: back off."""

    code = "too_many_pending"


class ShuttingDown(CorralError):
    """The service has stopped taking new work."""

    code = "shutting_down"


class StoreUnavailable(CorralError):
    """The database could not take a write (unreachable, full, locked, or a session whose last
    write is being repaired): nothing was recorded; retry after ``retry_after`` seconds."""

    code = "store_unavailable"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Fenced(StoreUnavailable):
    """This node's lease is gone (another node took its sessions over): it may commit nothing
    more, and stops."""

    code = "node_fenced"


class OwnedElsewhere(CorralError):
    """The session's lane lives on another live node: the request goes there (forwarded by the
    API) rather than be served here."""

    code = "owned_elsewhere"

    def __init__(self, message: str, node_id: str, url: str):
        super().__init__(message)
        self.node_id = node_id
        self.url = url


class StoreRejected(CorralError):
    """The store refused the data itself (a value its column cannot hold): the same write will
    fail again, so a transition that keeps failing this way is recorded in a simpler form."""

    code = "store_rejected"


class RunWriteFailed(CorralError):
    """A write of the run's own progress (a step, a tool result, a steer) failed; the run fails
    rather than go on with a history that lacks it."""

    code = "run_write_failed"


class StoreConflict(Conflict):
    """A write broke a uniqueness rule of the store (a name or key taken meanwhile, perhaps by
    another process); the store translates its driver's error into this one."""

    code = "store_conflict"


class ProviderError(CorralError):
    """The model provider failed; the run fails with this error."""

    code = "provider_error"


class ProviderUnavailable(ProviderError):
    """A transient provider failure (429, 5xx, a dropped connection, a timeout): worth a retry.

    ``retry_after`` is the server's own hint, in seconds, when it gave one.
    """

    code = "provider_unavailable"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ToolError(CorralError):
    """A tool failed; the model sees the message as the tool's result."""

    code = "tool_error"


class StepLimitExceeded(CorralError):
    """The run used every step its agent allows without a final answer."""

    code = "step_limit"


class AgentUnavailable(CorralError):
    """The run's agent failed to start or was deleted."""

    code = "agent_unavailable"


class ExternalAgentError(CorralError):
    """An external (ACP) agent failed: its process exited, or it answered a prompt with an error."""

    code = "external_agent_error"


class InvalidTransition(CorralError):
    """A run was asked to move between two states the transition table forbids (a bug)."""

    code = "invalid_transition"


class Unauthorized(CorralError):
    """No valid API token was given."""

    code = "unauthorized"


class Forbidden(CorralError):
    """The caller is known but may not do this (an admin-only action)."""

    code = "forbidden"


class BodyTooLarge(CorralError):
    """The request body is over the configured limit."""

    code = "body_too_large"
