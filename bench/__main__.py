"""`python -m bench [NAME ...]`: run benchmarks, print a table, write JSON to bench/results/.

Names: `foundation` (the default), `chat` and `web`; `all` runs every one
(`python -m bench.web --screenshot` writes docs/screenshot-chat.png).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import chat, foundation, web

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def foundation_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("agent start, POST /v1/agents (startup_ms=3000)", "p50 {p50_ms:.1f} ms, max {max_ms:.1f} ms",
         results["agent_start"]),
        ("first SSE event after POST (idle)", "p50 {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms", results["first_event"]),
        ("throughput, 200 sessions x 5 turns, latency_ms=0", "{turns_per_s:.0f} turns/s ({seconds:.2f} s)",
         results["throughput"]),
    ]


def chat_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("corral chat: first token after Enter ({samples} x hello)".format(**results["chat_ttft"]),
         "p50 {p50_ms:.1f} ms, p90 {p90_ms:.1f} ms, max {max_ms:.1f} ms (start-up {startup_ms:.0f} ms)",
         results["chat_ttft"]),
    ]


def web_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("web: page load to a sidebar of {sessions} busy sessions".format(**results["page_load"]),
         "{load_ms:.0f} ms", results["page_load"]),
        ("web: JS heap used", "{heap_loaded_mb:.1f} MB after load, {heap_after_mb:.1f} MB after the window",
         results["memory"]),
        ("web: {seconds:.0f} s with 1 session streaming, 50 updating".format(**results["smoothness"]),
         "frame p50 {frame_p50_ms:.1f} ms, p95 {frame_p95_ms:.1f} ms, max {frame_max_ms:.0f} ms; "
         "{long_tasks} long tasks ({long_task_total_ms:.0f} ms); {feed_frames_per_s:.0f} feed frames/s, "
         "{session_events_per_s:.0f} chat events/s", results["smoothness"]),
    ]


BENCHES: dict[str, tuple[Callable[[], Coroutine[Any, Any, dict[str, Any]]],
                         Callable[[dict[str, Any]], list[tuple[str, str, dict[str, Any]]]]]] = {
    "foundation": (foundation.run, foundation_rows),
    "chat": (chat.run, chat_rows),
    "web": (web.run, web_rows),
}


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'scenario'.ljust(width)}  result", f"{'-' * width}  {'-' * 30}"]
    lines += [f"{name.ljust(width)}  {fmt.format(**data)}" for name, fmt, data in rows]
    return "\n".join(lines)


def main() -> None:
    names = sys.argv[1:] or ["foundation"]
    if names == ["all"]:
        names = list(BENCHES)
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)} or all")
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        run, rows = BENCHES[name]
        results = asyncio.run(run())
        print(table(rows(results)))
        path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
