"""What the network providers share: their options, their API key, retries, tool names.

A retry happens only before the first part of a reply has been streamed: once text has
reached observers, repeating the call would show it twice, so a later failure fails the
call instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from corral.errors import InvalidInput, ProviderError, ProviderUnavailable
from corral.providers.base import ModelRequest, StreamPart


class RemoteOptions(BaseModel):
    """``provider_options`` of the ``openai`` and ``anthropic`` providers."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1 for a local server")
    api_key_env: str | None = Field(None, description="the environment variable that holds the key")
    api_key: SecretStr | None = Field(None, description="the key itself (prefer api_key_env)")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per call: connecting, and each wait for data")
    max_concurrent_calls: int = Field(16, ge=1, le=10_000)
    max_retries: int = Field(3, ge=0, le=20)
    retry_base_s: float = Field(0.5, ge=0, le=60)
    retry_max_s: float = Field(30.0, ge=0, le=600)
    max_tokens: int | None = Field(None, ge=1, description="cap on the reply (anthropic default: 4096)")
    temperature: float | None = Field(None, ge=0, le=2)
    check_model: bool = Field(False, description="at start, fail unless the server lists the model")

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteOptions:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    def resolve_key(self, default_env: str) -> str:
        """The API key, read at start so a key set after agent creation is picked up.

        A local server (``base_url`` given) usually wants no key; the SDKs insist on
        some string, so it gets a placeholder.
        """
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        env = self.api_key_env or default_env
        key = os.environ.get(env)
        if key:
            return key
        if self.base_url is not None and self.api_key_env is None:
            return "no-key"
        raise ProviderError(f"no API key: set the environment variable {env} (or provider_options.api_key_env)")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.retry_base_s, self.retry_max_s)


def remote_options(provider: str, raw: dict[str, object]) -> RemoteOptions:
    try:
        return RemoteOptions.model_validate(raw)
    except ValueError as exc:
        raise InvalidInput(f"bad provider_options for the {provider} provider: {exc}") from exc


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """The server's ``Retry-After`` when it gave one, else exponential backoff with full jitter
        (so many runs that failed together do not come back together)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_s)
        return random.uniform(0, min(self.max_s, self.base_s * 2**attempt))


Sleep = Callable[[float], Awaitable[None]]


async def with_retries(
    attempt: Callable[[], AsyncGenerator[StreamPart, None]], policy: RetryPolicy, sleep: Sleep = asyncio.sleep
) -> AsyncGenerator[StreamPart, None]:
    """Stream ``attempt()``, starting it again after a transient failure that came before any part."""
    failures = 0
    while True:
        streamed = False
        try:
            async with aclosing(attempt()) as parts:
                async for part in parts:
                    streamed = True
                    yield part
            return
        except ProviderUnavailable as exc:
            if streamed or failures >= policy.max_retries:
                raise
            await sleep(policy.delay(failures, exc.retry_after))
            failures += 1


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is rare from model APIs and is ignored)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ToolNames:
    """Model APIs allow only ``[A-Za-z0-9_-]{1,64}`` as a tool name; Corral's MCP tools are
    ``server.tool``. Names go out safe and come back as they were."""

    def __init__(self, names: Iterable[str]):
        self._out: dict[str, str] = {}
        self._back: dict[str, str] = {}
        for name in names:
            self.outgoing(name)

    def outgoing(self, name: str) -> str:
        known = self._out.get(name)
        if known is not None:
            return known
        base = _UNSAFE.sub("_", name)[:64] or "tool"
        safe, n = base, 1
        while safe in self._back:
            n += 1
            suffix = f"_{n}"
            safe = base[: 64 - len(suffix)] + suffix
        self._out[name], self._back[safe] = safe, name
        return safe

    def incoming(self, safe: str) -> str:
        return self._back.get(safe, safe)


TRANSIENT_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def classify(provider: str, *, status: int | None, message: str, retry_after: str | None = None,
             connection: bool = False) -> ProviderError:
    """An SDK failure as Corral's error: transient ones (retried) apart from the rest (failing the run)."""
    if connection:
        return ProviderUnavailable(f"{provider}: connection failed: {message}")
    if status is None:
        return ProviderError(f"{provider}: {message}")
    text = f"{provider}: HTTP {status}: {message}"
    if status in TRANSIENT_STATUS:
        return ProviderUnavailable(text, retry_after_seconds(retry_after))
    return ProviderError(text)


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's JSON arguments; broken JSON is passed on so the tool's validation tells the model."""
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        arguments = None
    return arguments if isinstance(arguments, dict) else {"invalid_arguments": raw}


class SdkClient(Protocol):
    async def close(self) -> None: ...


Client = TypeVar("Client", bound=SdkClient)


class RemoteProvider(Generic[Client]):
    """What the SDK-backed providers share: a model name, options, the client's life, retries.

    A subclass creates its client in ``start`` and streams one attempt in ``_attempt``.
    """

    name = "remote"

    def __init__(self, model: str | None, options: RemoteOptions):
        if not model:
            raise ProviderError(f"the {self.name} provider needs a model name (the agent's `model`)")
        self.model = model
        self.options = options
        self.max_concurrent_calls = options.max_concurrent_calls
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model={self.model} base_url={self.options.base_url}>"

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ProviderError("the provider was not started")
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    def stream(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        return with_retries(lambda: self._attempt(request), self.options.retry_policy())

    def _attempt(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        raise NotImplementedError


__all__ = ["ProviderUnavailable", "RemoteOptions", "RemoteProvider", "RetryPolicy", "ToolNames", "classify",
           "parse_arguments", "remote_options", "with_retries"]
