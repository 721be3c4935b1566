"""A channel's supervision, with a scripted platform: a crash of the channel's own code is that
channel's alone, backs off, and recovers; a restart skips the wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from corral.channels import ChannelSpec, State
from corral.channels.platforms.base import Delivery, Inbound, Take
from corral.channels.runtime import ChannelRuntime
from corral.kernel import Kernel

LIMIT = 20


class Flaky:
    """Its receive loop raises (a bug in the channel's own code) for the first ``crashes`` attempts."""

    wants_final = False

    def __init__(self, crashes: int, attempts: list[int], steady: asyncio.Event):
        self._crashes = crashes
        self._attempts = attempts
        self._steady = steady

    async def start(self) -> None:
        self._attempts.append(1)

    async def receive(self, take: Take, on_trouble: Callable[[Exception | None], None]) -> None:
        if len(self._attempts) <= self._crashes:
            raise RuntimeError("boom in the channel's own code")
        self._steady.set()
        await asyncio.Event().wait()

    def parse_push(self, headers: Mapping[str, str], body: bytes) -> list[Inbound]:
        return []

    async def deliver(self, delivery: Delivery, target_id: str | None) -> str | None:
        return None

    async def typing(self, chat_id: str, thread_id: str | None) -> None: ...

    async def aclose(self) -> None: ...


def spec(name: str) -> ChannelSpec:
    return ChannelSpec.model_validate({"name": name, "kind": "webhook", "secret_env": "UNUSED",
                                       "callback_url": "http://127.0.0.1:9/"})


async def test_a_crash_backs_off_and_recovers_and_leaves_the_other_channel_alone(kernel: Kernel) -> None:
    crashing: list[int] = []
    steady: list[int] = []
    recovered = asyncio.Event()
    flaky = ChannelRuntime(kernel, spec("flaky"), platform_factory=lambda s: Flaky(2, crashing, recovered))
    calm = ChannelRuntime(kernel, spec("calm"), platform_factory=lambda s: Flaky(0, steady, asyncio.Event()))
    tasks = [asyncio.create_task(flaky.serve()), asyncio.create_task(calm.serve())]
    try:
        async with asyncio.timeout(LIMIT):
            await calm.wait_running()
            await flaky.wait_state(State.BACKING_OFF)
            assert flaky.last_error is not None and "boom" in flaky.last_error
            assert flaky.next_attempt_at is not None
            loop = asyncio.get_running_loop()
            began = loop.time()
            flaky.restart()  # skips the backoff's wait: the second attempt comes at once
            await flaky.wait_state(State.STARTING)
            assert loop.time() - began < 0.5
            await recovered.wait()  # the third attempt, after a 1 s backoff, works
            assert len(crashing) == 3 and flaky.state is State.RUNNING and flaky.last_error is None
            assert steady == [1] and calm.state is State.RUNNING  # never touched
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    assert flaky.state is State.STOPPED
