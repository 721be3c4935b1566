"""The cluster benchmark keeps working: a tiny run of each of its parts on the local Postgres
(two nodes, writes to the owner and to random nodes, the forwarded POST, a kill -9 and the
takeover), its rows and its docs table."""

from __future__ import annotations

import pytest

from bench import cluster

pytestmark = pytest.mark.postgres  # bench.cluster's own fresh_database, on CORRAL_TEST_PG's server


async def test_a_tiny_cluster_run_on_the_local_postgres() -> None:
    plan = cluster.Plan(generators=1, warmup_s=0.2, measure_s=1.0, sessions=4, limit=4, latencies=(0,), nodes=(2,),
                        sqlite=False, lease_ttl_s=2.0, heartbeat_s=0.5, forward_samples=5, idle_s=0.5,
                        parked_sessions=3, queued_per_session=1, sleeping_sessions=2, sleep_s=1.0)
    results = await cluster.run(plan)

    owner, spread = results["configs"]
    assert (owner["routing"], spread["routing"]) == ("owner", "random")
    for config in (owner, spread):
        assert config["nodes"] == 2 and config["turns"] > 0 and config["latency"]["n"] == config["turns"]
        assert config["created_elsewhere"] == config["answered_elsewhere"] == 0  # owners name themselves
        assert len(config["node_cpu"]) == 2 and config["cpu_ms_per_turn"] > 0
        assert config["logs"]["errors"] == 0, config["logs"]
    assert owner["forwarded_share"] == 0
    # Each write of the spread goes to a node drawn at random: with only a few turns in the window
    # (a loaded machine), every draw may be the owner, so only a longer run must have forwarded some.
    assert spread["forwarded_share"] > 0 or spread["turns"] < 20, spread["turns"]

    forward = results["forwarding"]
    assert forward["owner"]["n"] == forward["forwarded"]["n"] == 5
    assert forward["answered_by_other"] == 0  # a forwarded answer names the owner

    taken = results["takeover"]
    assert taken["owned_at_kill"] == 5 and taken["running_at_kill"] == 2
    assert taken["violation_count"] == 0 and taken["lost"] == taken["twice"] == 0, taken["violations"]
    assert taken["first_202_s"] <= plan.lease_ttl_s + 5 and taken["drained_runs"] == 3 * 2 + 1  # parked, queued, probe

    text = cluster.markdown(results)
    assert "writes to a random node" in text and "first 202 via the survivor" in text
    assert [row.met is None for row in cluster.rows(results)] == [True, True, False, False]
