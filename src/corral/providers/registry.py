"""Turns an agent's provider name and options into a provider instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.errors import InvalidInput
from corral.providers.base import Provider
from corral.providers.demo import DemoProvider, demo_options
from corral.providers.fallback import FallbackProvider
from corral.providers.remote import remote_options
from corral.specs import AgentSpec


def _demo(model: str | None, options: dict[str, Any]) -> Provider:
    return DemoProvider(demo_options(options))


def _openai(model: str | None, options: dict[str, Any]) -> Provider:
    from corral.providers.openai_chat import OpenAIChatProvider  # the SDK loads only when used

    return OpenAIChatProvider(model, remote_options("openai", options))


def _anthropic(model: str | None, options: dict[str, Any]) -> Provider:
    from corral.providers.anthropic_messages import AnthropicProvider

    return AnthropicProvider(model, remote_options("anthropic", options))


FACTORIES: dict[str, Callable[[str | None, dict[str, Any]], Provider]] = {
    "demo": _demo,
    "openai": _openai,
    "anthropic": _anthropic,
}
VALIDATORS: dict[str, Callable[[dict[str, Any]], object]] = {
    "demo": demo_options,
    "openai": lambda options: remote_options("openai", options),
    "anthropic": lambda options: remote_options("anthropic", options),
}
NEEDS_MODEL = frozenset({"openai", "anthropic"})


def _check(provider: str, model: str | None, options: dict[str, Any]) -> None:
    validate = VALIDATORS.get(provider)
    if validate is None:
        raise InvalidInput(f"unknown provider {provider!r}; available: {', '.join(FACTORIES)}")
    validate(options)
    if provider in NEEDS_MODEL and not model:
        raise InvalidInput(f"the {provider} provider needs a model name")


def validate_agent(spec: AgentSpec) -> None:
    """Raise ``InvalidInput`` now, at agent creation, rather than at the first run."""
    _check(spec.provider, spec.model, spec.provider_options)
    for fallback in spec.fallbacks:
        _check(fallback.provider, fallback.model, fallback.provider_options)


def create_provider(spec: AgentSpec) -> Provider:
    primary = FACTORIES[spec.provider](spec.model, spec.provider_options)
    if not spec.fallbacks:
        return primary
    rest = [FACTORIES[f.provider](f.model, f.provider_options) for f in spec.fallbacks]
    return FallbackProvider([primary, *rest])
