"""What goes wrong in a channel, grouped by what the channel does next.

A platform's answer is classified once, at the client's boundary (``platforms/``), never
by matching message text: ``RetryAfter`` (the platform asked us to wait: 429), ``Transient``
(5xx, a timeout, a dropped connection: try again with backoff), ``Rejected`` (this request
will never succeed: mark the delivery failed), ``AuthRejected`` (the token is wrong: the
channel restarts with backoff). Messages never carry a secret: a client strips its token
from anything it raises.
"""

from __future__ import annotations

from corral.errors import CorralError


class ChannelError(CorralError):
    code = "channel_error"


class MissingSecret(ChannelError):
    """A channel's secret variable is unset: the channel cannot start (its own failure, shown in its state)."""

    code = "channel_secret_missing"


class NotBuilt(ChannelError):
    """A channel of a kind whose runtime does not exist yet (Slack, Discord)."""

    code = "channel_kind_not_built"


class PlatformError(ChannelError):
    code = "platform_error"


class RetryAfter(PlatformError):
    """The platform refused for now and said how long to wait (HTTP 429 ``retry_after``)."""

    code = "platform_rate_limited"

    def __init__(self, message: str, retry_after: float, *, whole_channel: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        # True when the limit is the bot's as a whole (Discord's global limit), not one chat's.
        self.whole_channel = whole_channel


class Transient(PlatformError):
    """5xx, a timeout or a dropped connection: worth another try, after a backoff."""

    code = "platform_unavailable"


class Rejected(PlatformError):
    """The platform refused this request for good (a 4xx other than 401 and 429)."""

    code = "platform_rejected"


class AuthRejected(PlatformError):
    """The platform refused the channel's token."""

    code = "platform_auth_rejected"


class ChannelNotRunning(ChannelError):
    """An inbound request for a channel that is not running now: the platform retries later."""

    code = "channel_not_running"
