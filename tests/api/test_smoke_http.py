from __future__ import annotations

from corral.settings import Settings
from tests.helpers import client, http_server


async def test_post_and_read_back_over_http(settings: Settings) -> None:
    async with http_server(settings) as (base, _kernel), client(base) as http:
        session = (await http.post("/v1/sessions", json={"agent": "assistant"})).json()
        accepted = await http.post(f"/v1/sessions/{session['id']}/messages", json={"content": "hi"})
        assert accepted.status_code == 202
        run_id = accepted.json()["run_id"]
        async with http.stream("GET", f"/v1/runs/{run_id}/events") as stream:
            kinds = [line.split(": ", 1)[1] async for line in stream.aiter_lines() if line.startswith("event:")]
        assert kinds[-1] == "run.completed"
        run = (await http.get(f"/v1/runs/{run_id}")).json()
        assert run["output"] == "echo: hi"
