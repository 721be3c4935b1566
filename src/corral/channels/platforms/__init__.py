"""One module per platform, each a ``Platform`` (``base``); a platform's own SDK, if any, is
imported only by its module, when a channel of that kind starts."""

from __future__ import annotations

from corral.channels.config import ChannelSpec, Kind
from corral.channels.errors import NotBuilt
from corral.channels.platforms.base import Delivery, Inbound, Platform, Take

__all__ = ["Delivery", "Inbound", "Platform", "Take", "platform_for"]


def platform_for(spec: ChannelSpec) -> Platform:
    """The platform client of a channel, with its secrets read now (``MissingSecret`` if unset)."""
    if spec.kind is Kind.TELEGRAM:
        from corral.channels.platforms.telegram import Telegram

        return Telegram(spec)
    if spec.kind is Kind.SLACK:
        from corral.channels.platforms.slack import Slack

        return Slack(spec)
    if spec.kind is Kind.DISCORD:
        from corral.channels.platforms.discord import Discord

        return Discord(spec)
    if spec.kind is Kind.WEBHOOK:
        from corral.channels.platforms.webhook import Webhook

        return Webhook(spec)
    raise NotBuilt(f"{spec.kind.value} channels are not built")
