"""A channel's configuration (``[[channels]]`` in ``corral.toml``), and each platform's limits.

Secrets are never in the file: a channel names the environment variables that hold them
(``token_env``, ...), read when the channel starts, so a wrong or missing one is that
channel's error (shown at ``GET /v1/channels``), never the service's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.channels.errors import MissingSecret
from corral.types import Mode

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Kind(StrEnum):
    TELEGRAM = "telegram"
    SLACK = "slack"
    DISCORD = "discord"
    WEBHOOK = "webhook"


class DmScope(StrEnum):
    """Which direct messages share a session (group chats are always one session per chat and thread)."""

    PER_CHAT = "per-chat"
    PER_USER = "per-user"
    SHARED = "shared"


# How a channel hears its platform; the first of each kind is its default.
TRANSPORTS: dict[Kind, tuple[str, ...]] = {
    Kind.TELEGRAM: ("polling", "webhook"),
    Kind.SLACK: ("socket", "events"),
    Kind.DISCORD: ("gateway",),
    Kind.WEBHOOK: ("http",),
}

DEFAULT_BASE_URLS: dict[Kind, str | None] = {
    Kind.TELEGRAM: "https://api.telegram.org/bot",  # python-telegram-bot's base_url: {base_url}{token}/{method}
    Kind.SLACK: "https://slack.com/api/",  # slack_sdk's base_url
    Kind.DISCORD: "https://discord.com/api/v10",
    Kind.WEBHOOK: None,
}


@dataclass(frozen=True)
class PlatformLimits:
    """What a platform allows: a message's length, and how often a bot may send or edit.

    ``chat_interval_s``: at least this long between two messages or edits in one chat;
    ``global_per_s``: at most this many in any second, all chats together; ``edit_interval_s``:
    how often a streaming reply is edited (never faster than the chat interval allows).
    """

    text_limit: int
    chat_interval_s: float
    global_per_s: float
    edit_interval_s: float


# Telegram: 4096 characters; one message a second per chat, 30 a second in all (its Bot FAQ).
# Slack: 40,000 characters, 4,000 advised; chat.postMessage about one a second per channel, and
# Web API tier limits well above that for a workspace. Discord: 2,000 characters; 5 messages per
# 5 s per channel, 50 requests a second per bot.
LIMITS: dict[Kind, PlatformLimits] = {
    Kind.TELEGRAM: PlatformLimits(4096, 1.0, 30.0, 1.0),
    Kind.SLACK: PlatformLimits(4000, 1.0, 20.0, 1.0),
    Kind.DISCORD: PlatformLimits(2000, 1.0, 50.0, 1.0),
    Kind.WEBHOOK: PlatformLimits(20_000, 0.0, 1000.0, 1.0),
}


class ChannelSpec(BaseModel):
    """One ``[[channels]]`` entry."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique; in URLs (/v1/channels/NAME) and session keys")
    kind: Kind
    agent: str = Field("assistant", description="the agent that answers this channel's chats")
    token_env: str | None = Field(None, description="the variable holding the bot token (Telegram, Slack bot, Discord)")
    app_token_env: str | None = Field(None, description="Slack: the app-level token for Socket Mode")
    signing_secret_env: str | None = Field(None, description="Slack: the signing secret of the Events API")
    secret_env: str | None = Field(None, description="webhook: the HMAC secret; Telegram webhook: its secret_token")
    allow: list[str] = Field(default_factory=list, description='platform user ids allowed, or ["*"]; default nobody')
    mode: Mode = Field(Mode.STEER, description="arrival mode of a message that lands while the chat's run is busy")
    debounce_ms: int = Field(0, ge=0, le=60_000, description="a burst of messages this close becomes one run")
    dm_scope: DmScope = DmScope.PER_CHAT
    base_url: str | None = Field(None, description="the platform's API root (default: the platform's own)")
    transport: str | None = Field(None, description="telegram: polling|webhook; slack: socket|events")
    callback_url: str | None = Field(None, description="webhook: where replies are POSTed")
    webhook_url: str | None = Field(None, description="telegram webhook: the public URL given to setWebhook")
    gateway_url: str | None = Field(None, description="discord: the gateway's URL (default: asked of the REST API)")
    poll_timeout_s: int = Field(25, ge=0, le=50, description="telegram polling: getUpdates' long-poll timeout")
    request_timeout_s: float = Field(10.0, gt=0, le=120, description="the longest one platform call may take")
    # Overrides of the platform's limits (PlatformLimits); None keeps the platform's own.
    text_limit: int | None = Field(None, ge=100, le=100_000)
    chat_interval_s: float | None = Field(None, ge=0, le=60)
    global_per_s: float | None = Field(None, gt=0, le=10_000)
    edit_interval_s: float | None = Field(None, ge=0.05, le=60)
    outbox_max_age_s: float = Field(86_400.0, gt=0, description="a reply undelivered this long is marked failed")

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("channel names are 1-32 letters, digits, '_' or '-', starting with a letter or digit")
        return value

    @field_validator("token_env", "app_token_env", "signing_secret_env", "secret_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_PATTERN.match(value):
            raise ValueError("must be the name of an environment variable, not its value")
        return value

    @field_validator("base_url", "callback_url", "webhook_url", "gateway_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(https?|wss?)://[^/\s]+", value):
            raise ValueError("must be an http(s):// or ws(s):// URL")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ChannelSpec:
        allowed = TRANSPORTS[self.kind]
        if self.transport is None:
            self.transport = allowed[0]
        elif self.transport not in allowed:
            raise ValueError(f"a {self.kind.value} channel's transport is one of {', '.join(allowed)}")
        slack = "app_token_env" if self.transport == "socket" else "signing_secret_env"
        needs = {Kind.TELEGRAM: ["token_env"], Kind.DISCORD: ["token_env"],
                 Kind.WEBHOOK: ["secret_env", "callback_url"], Kind.SLACK: ["token_env", slack]}
        if self.kind is Kind.TELEGRAM and self.transport == "webhook":
            needs[Kind.TELEGRAM].append("secret_env")
        missing = [name for name in needs[self.kind] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind.value} channel ({self.transport}) needs {', '.join(missing)}")
        return self

    @property
    def limits(self) -> PlatformLimits:
        base = LIMITS[self.kind]
        chat = base.chat_interval_s if self.chat_interval_s is None else self.chat_interval_s
        edit = base.edit_interval_s if self.edit_interval_s is None else self.edit_interval_s
        return PlatformLimits(self.text_limit or base.text_limit, chat,
                              self.global_per_s or base.global_per_s, max(edit, chat))

    @property
    def api_base(self) -> str | None:
        return self.base_url or DEFAULT_BASE_URLS[self.kind]

    def allows(self, user_id: str) -> bool:
        return "*" in self.allow or user_id in self.allow

    def secret(self, field: Literal["token_env", "app_token_env", "signing_secret_env", "secret_env"]) -> str:
        """The secret the named variable holds; ``MissingSecret`` (naming the variable only) if unset."""
        name = getattr(self, field)
        value = os.environ.get(name) if name else None
        if not value:
            raise MissingSecret(f"the environment variable {name} ({field}) is not set")
        return value


def unique_names(specs: list[ChannelSpec]) -> list[ChannelSpec]:
    names = [spec.name for spec in specs]
    dupes = sorted({name for name in names if names.count(name) > 1})
    if dupes:
        raise ValueError(f"channel names must be unique: {', '.join(dupes)}")
    return specs
