"""Memory a crowd of observers leaves behind goes back to the system (corral/memory.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from corral.memory import LEFT_BEFORE_TRIM, FreedMemory


async def test_memory_is_given_back_once_a_crowd_has_left_and_settled() -> None:
    async with asyncio.timeout(10):
        trimmed = asyncio.Event()

        def trim(pad: int) -> int:
            trimmed.set()
            return 1

        freed = FreedMemory(trim, settle_s=0.0)
        for _ in range(LEFT_BEFORE_TRIM - 1):
            freed.left()
        assert freed._timer is None  # a few observers leaving are no crowd: nothing is scheduled
        freed.left()
        await trimmed.wait()
        assert freed.trims == 1
        trimmed.clear()
        for _ in range(LEFT_BEFORE_TRIM):  # the count starts again
            freed.left()
        await trimmed.wait()
        assert freed.trims == 2


async def test_many_leaving_at_once_trim_once() -> None:
    async with asyncio.timeout(10):
        calls: list[int] = []
        trimmed = asyncio.Event()

        def trim(pad: int) -> int:
            calls.append(pad)
            trimmed.set()
            return 1

        freed = FreedMemory(trim, settle_s=0.05)
        for _ in range(5 * LEFT_BEFORE_TRIM):
            freed.left()
        await trimmed.wait()
        assert calls == [0] and freed.trims == 1 and freed._timer is None


def test_the_process_shrinks_after_buffers_like_stalled_observers_are_freed() -> None:
    """In a process of its own: 200 connection-sized buffers, grown as a transport grows them,
    between small objects that stay; freed, the process stays at its size until the trim."""
    script = textwrap.dedent("""
        import asyncio
        from corral.memory import LEFT_BEFORE_TRIM, FreedMemory

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
            memory = FreedMemory(settle_s=0.0)
            for _ in range(LEFT_BEFORE_TRIM):
                memory.left()
            while not memory.trims:
                await asyncio.sleep(0.01)
            print(peak, freed_at, rss_mb())

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    peak, freed_at, trimmed = map(float, done.stdout.split())
    assert freed_at > peak - 4  # freed, but still the process's: the allocator keeps it
    assert trimmed < freed_at - 8, (peak, freed_at, trimmed)  # ~16 MB of buffers given back
