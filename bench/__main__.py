"""`python -m bench`: run the scenarios, print a table, write JSON to bench/results/."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import foundation

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        ("agent start, POST /v1/agents (startup_ms=3000)", "p50 {p50_ms:.1f} ms, max {max_ms:.1f} ms",
         results["agent_start"]),
        ("first SSE event after POST (idle)", "p50 {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms", results["first_event"]),
        ("throughput, 200 sessions x 5 turns, latency_ms=0", "{turns_per_s:.0f} turns/s ({seconds:.2f} s)",
         results["throughput"]),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'scenario'.ljust(width)}  result", f"{'-' * width}  {'-' * 30}"]
    lines += [f"{name.ljust(width)}  {fmt.format(**data)}" for name, fmt, data in rows]
    return "\n".join(lines)


def main() -> None:
    results = asyncio.run(foundation.run())
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"foundation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
