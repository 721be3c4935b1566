"""``/metrics``: the counters and histograms move with real traffic; gauges read current state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from corral.settings import Settings
from tests.helpers import client, http_server, new_http_session, post, read_run


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_follow_the_traffic(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        for content in ("hello", '/tool wait {"ms": 1}', "/fail"):
            await read_run(http, (await post(http, sid, content))["run_id"])
        blocker = await post(http, sid, "/sleep 30")
        refused = await http.post(f"/v1/sessions/{sid}/messages", json={"content": "no", "mode": "reject"})
        assert refused.status_code == 409
        response = await http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        got = samples(response.text)
        assert got[("corral_runs_ended_total", (("status", "completed"),))] == 2
        assert got[("corral_runs_ended_total", (("status", "failed"),))] == 1
        assert got[("corral_inputs_rejected_total", (("reason", "session_busy"),))] == 1
        assert got[("corral_tool_call_seconds_count", (("tool", "wait"),))] == 1
        assert got[("corral_model_call_seconds_count", (("provider", "demo"),))] >= 3
        assert got[("corral_provider_slot_wait_seconds_count", (("priority", "interactive"),))] >= 3
        assert got[("corral_lane_wait_seconds_count", ())] == 4
        assert got[("corral_events_appended_total", ())] > 10
        assert got[("corral_commit_batch_units_count", ())] > 0
        assert got[("corral_runs_active", ())] == 1  # the /sleep run
        assert got[("corral_inputs_queued", (("class", "interactive"),))] == 0
        await http.post(f"/v1/runs/{blocker['run_id']}/cancel", json={"mode": "hard"})


async def test_metrics_need_the_token_when_there_is_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_token="metrics-token-0123456789", shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        assert (await http.get("/metrics")).status_code == 401
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"})
        assert scraped.status_code == 200 and "corral_runs_active" in scraped.text
