"""``corral jobs add|list|rm``: schedules that wake agents (``/v1/jobs``)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from corral.cli.client import CorralClient
from corral.cli.commands import call


def parse_schedule(cron: str | None, tz: str, every: float | None, at: str | None) -> dict[str, Any]:
    chosen = [value for value in (cron, every, at) if value is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --cron, --every or --at")
    if cron is not None:
        return {"cron": cron, "tz": tz}
    if every is not None:
        return {"every_s": every}
    return {"at": at}


def add(url: str, token: str | None, body: dict[str, Any]) -> int:
    async def work(api: CorralClient) -> int:
        job = await api.request("POST", "/v1/jobs", body=body)
        sys.stdout.write(json.dumps(job) + "\n")
        return 0

    return call(url, token, work)


def list_jobs(url: str, token: str | None, as_json: bool) -> int:
    async def work(api: CorralClient) -> int:
        jobs = await api.request("GET", "/v1/jobs")
        if as_json:
            sys.stdout.write(json.dumps(jobs) + "\n")
            return 0
        table = Table("id", "agent", "schedule", "next fire", "session", "message", box=None, header_style="bold")
        for job in jobs:
            schedule = ", ".join(f"{k}={v}" for k, v in job["schedule"].items())
            table.add_row(job["id"], job["agent"], schedule, job["next_fire_at"] or "done",
                          job["session_id"] or "(new each time)", job["message"][:40])
        Console().print(table)
        return 0

    return call(url, token, work)


def remove(url: str, token: str | None, job_id: str) -> int:
    async def work(api: CorralClient) -> int:
        await api.request("DELETE", f"/v1/jobs/{job_id}")
        return 0

    return call(url, token, work)
