"""Chat channels (DESIGN.md section 6b, docs/channels.md): Telegram, Slack, Discord and a signed
webhook, each an independent supervised runtime inside ``corral serve``.

- ``config``: ``[[channels]]`` entries and each platform's limits (plain data: the settings
  load it, and nothing else of the package);
- ``runtime``: one channel's supervised service, its state and its restarts;
- ``chats``: allow lists, per-chat sessions, commands, messages into the kernel;
- ``followers`` and ``reply``: a run's events into reply rows (streamed edits, splits, approvals);
- ``outbox``: the durable outbox and its rate-limited sender;
- ``platforms``: one client per platform.

The names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.lazy import lazy_attributes

if TYPE_CHECKING:
    from corral.channels.config import ChannelSpec, DmScope, Kind
    from corral.channels.manager import Channels, install_channels
    from corral.channels.runtime import ChannelRuntime, State

__all__ = ["ChannelRuntime", "ChannelSpec", "Channels", "DmScope", "Kind", "State", "install_channels"]

_HOMES = {
    "ChannelSpec": "corral.channels.config",
    "DmScope": "corral.channels.config",
    "Kind": "corral.channels.config",
    "Channels": "corral.channels.manager",
    "install_channels": "corral.channels.manager",
    "ChannelRuntime": "corral.channels.runtime",
    "State": "corral.channels.runtime",
}

__getattr__ = lazy_attributes(__name__, _HOMES)
