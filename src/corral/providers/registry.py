"""Turns an agent's provider name and options into a provider instance."""

from __future__ import annotations

from typing import Any

from corral.errors import InvalidInput
from corral.providers.base import Provider
from corral.providers.demo import DemoProvider, demo_options

KNOWN_PROVIDERS = ("demo",)


def validate_options(provider: str, options: dict[str, Any]) -> None:
    """Raise ``InvalidInput`` now, at agent creation, rather than at the first run."""
    if provider == "demo":
        demo_options(options)
        return
    raise InvalidInput(f"unknown provider {provider!r}; available: {', '.join(KNOWN_PROVIDERS)}")


def create_provider(provider: str, model: str | None, options: dict[str, Any]) -> Provider:
    if provider == "demo":
        return DemoProvider(demo_options(options))
    raise InvalidInput(f"unknown provider {provider!r}; available: {', '.join(KNOWN_PROVIDERS)}")
