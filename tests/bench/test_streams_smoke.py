"""The observers-and-streams benchmark keeps working: a tiny run of each scenario against real
servers, and its rows."""

from __future__ import annotations

from bench import streams


async def test_a_tiny_audience_run() -> None:
    plan = streams.AudiencePlan(stalled=3, readers=4, words=20, background_sessions=2, settle_s=0.2,
                                measure_s=1.0, generators=1)
    results = await streams.audience(plan)
    phases = {phase["name"]: phase for phase in results["phases"]}
    assert list(phases) == list(streams.PHASES)
    assert phases["none"]["deltas_per_s"] > 0 and phases["readers"]["deliveries_per_s"] > 0
    assert phases["stalled"]["observers"] == 3
    rows = streams.audience_rows(results)
    assert len(rows) == 4 and rows[1].met is not None


async def test_a_tiny_per_turn_run() -> None:
    plan = streams.PerTurnPlan(clients=4, turns=2, generators=1, repeats=1, langgraph=False)
    results = await streams.per_turn(plan)
    for mode in streams.MODES:
        assert results["modes"][mode]["turns_per_s"] > 0, mode
    assert [row.met is None for row in streams.per_turn_rows(results)] == [True, False, False]
