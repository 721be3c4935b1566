"""Start-up: how long `corral serve` takes to answer, and what a client command costs.

Every second of a start is downtime after a crash. Each start is timed from just before the
process is spawned (`python -m corral serve`) to the first 200 of `GET /healthz`, polled
every 10 ms, and the server's CPU time is read at that moment:
- a new database: an empty data directory, so SQLite is created and migrated from nothing;
- a restart: the same directory again, its database at the newest revision (what a restart
  after a crash finds).
Then `corral runs --json` (one request, its output parsed) against the first restarted server
is timed from spawn to exit, and a fresh interpreter that imports the client commands lists the
server modules they loaded (none is the goal: a client command should cost what a client costs).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import Row
from bench.server import serve

TARGET_S = 1.5
POLL_S = 0.01
# What only the server needs (tests/test_import_weight.py checks each client command for it).
SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "mcp", "acp", "openai", "anthropic",
                  "corral.api", "corral.store", "corral.kernel", "corral.services", "corral.loop")
CLIENT_PROBE = f"""
import json, sys
import corral.cli.main, corral.cli.commands, corral.cli.chat, corral.cli.jobs
packages = {SERVER_MODULES!r}
print(json.dumps(sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in packages))))
"""


@dataclass(frozen=True)
class Plan:
    starts: int = 5  # each on a new data directory, then once more on it
    client_runs: int = 5


QUICK = Plan(starts=3, client_runs=3)


async def _exec(*args: str) -> tuple[float, bytes]:
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {process.returncode}: {err.decode(errors='replace')}")
    return time.perf_counter() - began, out


async def _start(data_dir: Path, client_runs: int = 0) -> tuple[float, float, list[float]]:
    """Seconds from spawn to healthy, the server's CPU seconds by then, and as many timed
    `corral runs --json` against it as asked."""
    began = time.perf_counter()
    async with serve(data_dir, poll_s=POLL_S) as server:
        healthy, cpu = time.perf_counter() - began, server.cpu_seconds()
        client = []
        for _ in range(client_runs):
            seconds, out = await _exec("-m", "corral", "runs", "--json", "--url", server.base)
            json.loads(out)
            client.append(seconds)
    return healthy, cpu, client


async def run(plan: Plan) -> dict[str, Any]:
    new: list[tuple[float, float]] = []
    restart: list[tuple[float, float]] = []
    client: list[float] = []
    for index in range(plan.starts):
        with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
            healthy, cpu, _ = await _start(Path(directory))
            new.append((healthy, cpu))
            healthy, cpu, timed = await _start(Path(directory), plan.client_runs if index == 0 else 0)
            restart.append((healthy, cpu))
            client += timed
    _, out = await _exec("-c", CLIENT_PROBE)
    return {"new": _summary(new), "restart": _summary(restart), "client_s": _spread(client),
            "client_server_modules": json.loads(out), "target_s": TARGET_S}


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "samples_s": values}


def _summary(starts: list[tuple[float, float]]) -> dict[str, Any]:
    return {**_spread([wall for wall, _ in starts]), "cpu_median_s": statistics.median(cpu for _, cpu in starts)}


def rows(results: dict[str, Any]) -> list[Row]:
    new, restart, client, target = results["new"], results["restart"], results["client_s"], results["target_s"]

    def start(figures: dict[str, Any]) -> str:
        return (f"**median {figures['median_s']:.2f} s** (min {figures['min_s']:.2f}, max {figures['max_s']:.2f}; "
                f"{figures['n']} starts); server CPU {figures['cpu_median_s']:.2f} s")

    loaded = results["client_server_modules"]
    return [
        Row("start-up: `corral serve`, spawn to `/healthz` 200, new SQLite database", start(new),
            f"≤ {target:g} s", new["median_s"] <= target),
        Row("start-up: `corral serve` again on that database (a restart: no migration due)", start(restart),
            f"≤ {target:g} s", restart["median_s"] <= target),
        Row("client: `corral runs --json`, spawn to exit (one request)",
            f"**median {client['median_s']:.2f} s** (min {client['min_s']:.2f}, max {client['max_s']:.2f}; "
            f"{client['n']} runs); server modules its code imports: "
            + (", ".join(loaded[:8]) + (" ..." if len(loaded) > 8 else "") if loaded else "none"),
            "none", not loaded),
    ]
