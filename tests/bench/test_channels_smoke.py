"""The channels benchmark keeps working: a tiny run (5 chats, 2 messages each) against a real server."""

from __future__ import annotations

from bench import channels


async def test_a_tiny_channels_run() -> None:
    plan = channels.Plan(chats=5, messages=2, think_s=(0.1, 0.3), answer_within_s=30)
    results = await channels.run(plan)
    assert results["messages"] == 10 and results["first_text"]["n"] == results["whole"]["n"] == 10
    assert (results["lost"], results["duplicated"], results["violations"]) == (0, 0, 0)
    rows = channels.rows(results)
    assert [row.met for row in rows] == [True, None, True, True, None]
