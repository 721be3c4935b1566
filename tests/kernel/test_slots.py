"""The model slot: interactive waiters go before background ones; cancelled waiters lose nothing."""

from __future__ import annotations

import asyncio

from corral.kernel.slots import PrioritySlot


async def hold(slot: PrioritySlot, background: bool, order: list[str], name: str, release: asyncio.Event) -> None:
    await slot.acquire(background=background)
    order.append(name)
    try:
        await release.wait()
    finally:
        slot.release()


async def test_a_freed_slot_goes_to_the_interactive_waiter_first() -> None:
    async with asyncio.timeout(5):
        slot = PrioritySlot(1)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("first", "bg1", "bg2", "person")}
        first = asyncio.create_task(hold(slot, False, order, "first", release["first"]))
        await asyncio.sleep(0)  # one loop turn: "first" takes the free slot
        waiters = [asyncio.create_task(hold(slot, bg, order, name, release[name]))
                   for name, bg in (("bg1", True), ("bg2", True), ("person", False))]
        await asyncio.sleep(0)  # all three are queued now
        assert repr(slot) == "<PrioritySlot 1/1 in use, waiting: 1 interactive, 2 background>"
        for name in ("first", "person", "bg1", "bg2"):
            release[name].set()
        await asyncio.gather(first, *waiters)
        assert order == ["first", "person", "bg1", "bg2"]  # the person jumped both background runs
        assert slot.in_use == 0


async def test_a_cancelled_waiter_leaves_the_count_right() -> None:
    async with asyncio.timeout(5):
        slot = PrioritySlot(1)
        await slot.acquire(background=False)
        waiter = asyncio.create_task(slot.acquire(background=True))
        await asyncio.sleep(0)
        waiter.cancel()
        slot.release()  # the cancelled waiter must not absorb the slot
        assert slot.in_use == 0
        async with slot:
            assert slot.in_use == 1
        assert slot.in_use == 0
        async with slot.background():
            assert slot.in_use == 1
