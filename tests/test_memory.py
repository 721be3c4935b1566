"""Memory a crowd of observers leaves behind goes back to the system (corral/memory.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from corral.memory import CROWD, FreedMemory


class Trims:
    """A trim function that notes its calls and wakes the test."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.done = asyncio.Event()

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        self.done.set()
        return 1


async def test_memory_is_given_back_once_a_crowd_has_left_and_settled() -> None:
    async with asyncio.timeout(10):
        trims = Trims()
        freed = FreedMemory(trims, settle_s=0.0)
        for count in range(1, 2 * CROWD + 1):  # a crowd arrives
            freed.observers(count)
        for count in range(2 * CROWD - 1, CROWD, -1):  # fewer than half of it leaves: no crowd left yet
            freed.observers(count)
        assert freed._timer is None
        freed.observers(CROWD)  # half of the peak, and CROWD of them
        await trims.done.wait()
        assert trims.calls == [0] and freed.trims == 1
        trims.done.clear()
        for count in range(CROWD - 1, 0, -1):  # the peak starts again at the trim: 31 leave, no crowd
            freed.observers(count)
        assert freed._timer is None and freed.trims == 1


async def test_streams_that_come_and_go_one_a_turn_trigger_nothing() -> None:
    trims = Trims()
    freed = FreedMemory(trims, settle_s=0.0)
    for _ in range(10 * CROWD):  # a hundred clients, each opening and closing a stream a turn
        freed.observers(101)
        freed.observers(100)
    assert freed._timer is None and freed.trims == 0


async def test_a_crowd_leaving_over_a_while_is_one_trim() -> None:
    async with asyncio.timeout(10):
        trims = Trims()
        freed = FreedMemory(trims, settle_s=0.05)
        freed.observers(5 * CROWD)
        for count in range(5 * CROWD - 1, -1, -1):
            freed.observers(count)
        await trims.done.wait()
        assert trims.calls == [0] and freed.trims == 1 and freed._timer is None


def test_the_process_shrinks_after_buffers_like_stalled_observers_are_freed() -> None:
    """In a process of its own: 200 connection-sized buffers, grown as a transport grows them,
    between small objects that stay; freed, the process stays at its size until the trim."""
    script = textwrap.dedent("""
        import asyncio
        from corral.memory import FreedMemory

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

        async def main():
            buffers, stay = [], []
            for _ in range(200):
                buffer = bytearray()
                for _ in range(40):
                    buffer += b"x" * 2048
                buffers.append(buffer)
                stay.append([object() for _ in range(300)])
            peak = rss_mb()
            del buffers
            freed_at = rss_mb()
            trimmed = asyncio.Event()
            memory = FreedMemory(settle_s=0.0)
            real_trim = memory._trim
            memory._trim = lambda pad: (real_trim(pad), trimmed.set())[0]
            memory.observers(200)
            memory.observers(0)
            await trimmed.wait()
            print(peak, freed_at, rss_mb())

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    peak, freed_at, trimmed = map(float, done.stdout.split())
    assert freed_at > peak - 4  # freed, but still the process's: the allocator keeps it
    assert trimmed < freed_at - 8, (peak, freed_at, trimmed)  # ~16 MB of buffers given back
