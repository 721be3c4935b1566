"""The channels of a service: one ``ChannelRuntime`` per ``[[channels]]`` entry, each a kernel
service of its own (started after recovery, cancelled first at shutdown)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.channels.config import ChannelSpec
from corral.channels.runtime import ChannelRuntime, PlatformFactory
from corral.errors import NotFound

if TYPE_CHECKING:
    from corral.kernel import Kernel


class Channels:
    def __init__(self, runtimes: list[ChannelRuntime]):
        self._runtimes = {runtime.spec.name: runtime for runtime in runtimes}

    def __repr__(self) -> str:
        return f"<Channels {', '.join(repr(r) for r in self._runtimes.values()) or 'none'}>"

    def __len__(self) -> int:
        return len(self._runtimes)

    def get(self, name: str) -> ChannelRuntime:
        runtime = self._runtimes.get(name)
        if runtime is None:
            raise NotFound(f"no channel {name!r}")
        return runtime

    def all(self) -> list[ChannelRuntime]:
        return list(self._runtimes.values())

    async def view(self) -> list[dict[str, Any]]:
        return [await runtime.view() for runtime in self._runtimes.values()]


def install_channels(kernel: Kernel, specs: list[ChannelSpec], *,
                     platform_factory: PlatformFactory | None = None) -> Channels:
    """A runtime per channel, registered as the kernel's services (``channel:NAME``)."""
    runtimes = []
    for spec in specs:
        runtime = (ChannelRuntime(kernel, spec, platform_factory=platform_factory) if platform_factory is not None
                   else ChannelRuntime(kernel, spec))
        kernel.add_service(f"channel:{spec.name}", runtime.serve)
        runtimes.append(runtime)
    return Channels(runtimes)
