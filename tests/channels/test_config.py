"""``[[channels]]`` in corral.toml: what a channel entry must say, and what it may not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.channels import ChannelSpec, DmScope, Kind
from corral.settings import load_settings
from corral.types import Mode


def test_a_toml_channels_table_is_read_with_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text('[[channels]]\nname = "tg"\nkind = "telegram"\ntoken_env = "TG_TOKEN"\n\n'
                    '[[channels]]\nname = "hook"\nkind = "webhook"\nsecret_env = "HOOK_SECRET"\n'
                    'callback_url = "https://example.com/replies"\nallow = ["*"]\nmode = "queue"\ndebounce_ms = 500\n')
    settings = load_settings(path)
    tg, hook = settings.channels
    assert (tg.kind, tg.transport, tg.agent, tg.allow, tg.mode, tg.dm_scope) == (
        Kind.TELEGRAM, "polling", "assistant", [], Mode.STEER, DmScope.PER_CHAT)
    assert tg.api_base == "https://api.telegram.org/bot" and tg.limits.text_limit == 4096
    assert tg.limits.chat_interval_s == 1.0 and tg.limits.global_per_s == 30
    assert not tg.allows("42")  # the default allows nobody
    assert (hook.mode, hook.debounce_ms, hook.allows("anyone")) == (Mode.QUEUE, 500, True)


@pytest.mark.parametrize("entry, message", [
    ({"name": "tg", "kind": "telegram"}, "needs token_env"),
    ({"name": "tg", "kind": "telegram", "token_env": "T", "transport": "webhook"}, "needs secret_env"),
    ({"name": "tg", "kind": "telegram", "token_env": "T", "transport": "socket"}, "transport is one of"),
    ({"name": "hook", "kind": "webhook", "secret_env": "S"}, "needs callback_url"),
    ({"name": "tg", "kind": "telegram", "token_env": "123:abc-a-token-by-mistake"}, "name of an environment variable"),
    ({"name": "no/slash", "kind": "telegram", "token_env": "T"}, "channel names"),
    ({"name": "tg", "kind": "irc", "token_env": "T"}, "kind"),
    ({"name": "tg", "kind": "telegram", "token_env": "T", "dm_scope": "everyone"}, "dm_scope"),
])
def test_a_bad_entry_is_refused(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ChannelSpec.model_validate(entry)


def test_channel_names_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text('[[channels]]\nname = "a"\nkind = "telegram"\ntoken_env = "T"\n\n'
                    '[[channels]]\nname = "a"\nkind = "telegram"\ntoken_env = "U"\n')
    with pytest.raises(ValidationError, match="unique"):
        load_settings(path)
