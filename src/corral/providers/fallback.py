"""An agent's fallback list: when its provider fails before saying anything, the next one answers."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from corral.errors import ProviderError
from corral.providers.base import ModelRequest, Provider, StreamPart

log = logging.getLogger(__name__)


class FallbackProvider:
    """Tries its providers in order. A provider that already streamed part of a reply is not
    replaced mid-way (the text is out); its failure fails the call."""

    name = "fallback"

    def __init__(self, providers: Sequence[Provider]):
        assert providers, "a fallback list needs at least one provider"
        self.providers = list(providers)
        self.max_concurrent_calls = self.providers[0].max_concurrent_calls

    def __repr__(self) -> str:
        return f"<FallbackProvider {[p.name for p in self.providers]}>"

    async def start(self) -> None:
        started: list[Provider] = []
        try:
            for provider in self.providers:
                await provider.start()
                started.append(provider)
        except BaseException:
            for provider in started:
                await provider.aclose()
            raise

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()

    async def stream(self, request: ModelRequest) -> AsyncGenerator[StreamPart, None]:
        for index, provider in enumerate(self.providers):
            streamed = False
            try:
                async with aclosing(provider.stream(request)) as parts:
                    async for part in parts:
                        streamed = True
                        yield part
                return
            except ProviderError as exc:
                if streamed or index == len(self.providers) - 1:
                    raise
                log.warning("provider %s failed (%s); falling back to %s", provider.name, exc,
                            self.providers[index + 1].name)
