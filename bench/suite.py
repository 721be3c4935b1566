"""Every scenario by name: how to run it (full or quick) and how to show its results.

The registry is the one place that knows every scenario, so the console table, the JSON file
and the markdown of docs/benchmarks.md all come from the same rows.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import cluster, latency, lifecycle, peer, scale, startup, streams, throughput
from bench.monitor import FLAG_CORES
from bench.report import Row, machine_line, markdown_table


@dataclass(frozen=True)
class Options:
    quick: bool = False
    idle_sessions: int | None = None  # overrides the idle-scale count (100,000; 5,000 quick)
    generators: int | None = None  # load-generator processes (2 by default)


Runner = Callable[[Options], Coroutine[Any, Any, dict[str, Any]]]
Rows = Callable[[dict[str, Any]], list[Row]]


def _generators(plan: Any, options: Options) -> Any:
    return replace(plan, generators=options.generators) if options.generators else plan


async def _throughput(options: Options) -> dict[str, Any]:
    return await throughput.run(_generators(throughput.QUICK if options.quick else throughput.Plan(), options))


async def _first_event(options: Options) -> dict[str, Any]:
    plan = latency.FIRST_EVENT_QUICK if options.quick else latency.FirstEventPlan()
    return await latency.first_event(_generators(plan, options))


async def _isolation(options: Options) -> dict[str, Any]:
    plan = latency.ISOLATION_QUICK if options.quick else latency.IsolationPlan()
    return await latency.isolation(_generators(plan, options))


async def _fanout(options: Options) -> dict[str, Any]:
    return await latency.fanout(_generators(latency.FANOUT_QUICK if options.quick else latency.FanoutPlan(), options))


async def _idle(options: Options) -> dict[str, Any]:
    plan = _generators(scale.IDLE_QUICK if options.quick else scale.IdlePlan(), options)
    if options.idle_sessions:
        plan = replace(plan, sessions=options.idle_sessions)
    return await scale.idle_scale(plan)


async def _agent_start(options: Options) -> dict[str, Any]:
    return await scale.agent_start()


async def _stop(options: Options) -> dict[str, Any]:
    return await lifecycle.stop()


async def _recovery(options: Options) -> dict[str, Any]:
    return await lifecycle.recovery(lifecycle.RECOVERY_QUICK if options.quick else lifecycle.RecoveryPlan())


async def _startup(options: Options) -> dict[str, Any]:
    return await startup.run(startup.QUICK if options.quick else startup.Plan())


async def _peer(options: Options) -> dict[str, Any]:
    return await peer.run(_generators(peer.QUICK if options.quick else peer.Plan(), options))


async def _cluster(options: Options) -> dict[str, Any]:
    return await cluster.run(_generators(cluster.QUICK if options.quick else cluster.Plan(), options))


async def _audience(options: Options) -> dict[str, Any]:
    return await streams.audience(_generators(streams.AUDIENCE_QUICK if options.quick else streams.AudiencePlan(),
                                              options))


async def _per_turn(options: Options) -> dict[str, Any]:
    return await streams.per_turn(_generators(streams.PER_TURN_QUICK if options.quick else streams.PerTurnPlan(),
                                              options))


async def _chat(options: Options) -> dict[str, Any]:
    from bench import chat

    return await chat.run()


async def _channels(options: Options) -> dict[str, Any]:
    from bench import channels

    return await channels.run(channels.QUICK if options.quick else channels.Plan())


def _channels_rows(results: dict[str, Any]) -> list[Row]:
    from bench import channels

    return channels.rows(results)


async def _web(options: Options) -> dict[str, Any]:
    from bench import web

    return await web.run()


def _chat_rows(results: dict[str, Any]) -> list[Row]:
    ttft = results["chat_ttft"]
    return [Row(f"`corral chat`: Enter to the first byte of the answer ({ttft['samples']} x hello)",
                f"p50 {ttft['p50_ms']:.1f} ms, p90 {ttft['p90_ms']:.1f} ms, max {ttft['max_ms']:.1f} ms "
                f"(start-up to the first prompt {ttft['startup_ms']:.0f} ms)")]


def _web_rows(results: dict[str, Any]) -> list[Row]:
    load, memory, smooth = results["page_load"], results["memory"], results["smoothness"]
    return [
        Row(f"web: page load to a sidebar of {load['sessions']} busy sessions", f"{load['load_ms']:.0f} ms"),
        Row("web: JS heap used", f"{memory['heap_loaded_mb']:.1f} MB after load, {memory['heap_after_mb']:.1f} MB "
            "after the window"),
        Row(f"web: {smooth['seconds']:.0f} s with 1 session streaming, 50 updating",
            f"frame p50 {smooth['frame_p50_ms']:.1f} ms, p95 {smooth['frame_p95_ms']:.1f} ms, max "
            f"{smooth['frame_max_ms']:.0f} ms; {smooth['long_tasks']} long tasks "
            f"({smooth['long_task_total_ms']:.0f} ms); "
            f"{smooth['feed_frames_per_s']:.0f} feed frames/s, {smooth['session_events_per_s']:.0f} chat events/s"),
    ]


@dataclass(frozen=True)
class Scenario:
    run: Runner
    rows: Rows
    block: str  # the docs/benchmarks.md block its rows go to
    markdown: Callable[[dict[str, Any]], str] | None = None  # its own table instead of its rows


SCENARIOS: dict[str, Scenario] = {
    "throughput": Scenario(_throughput, throughput.rows, "suite"),
    "first-event": Scenario(_first_event, latency.first_event_rows, "suite"),
    "isolation": Scenario(_isolation, latency.isolation_rows, "suite"),
    "fanout": Scenario(_fanout, latency.fanout_rows, "suite"),
    "idle": Scenario(_idle, scale.idle_rows, "suite"),
    "agent-start": Scenario(_agent_start, scale.agent_rows, "suite"),
    "stop": Scenario(_stop, lifecycle.stop_rows, "suite"),
    "recovery": Scenario(_recovery, lifecycle.recovery_rows, "suite"),
    "startup": Scenario(_startup, startup.rows, "startup"),
    "peer": Scenario(_peer, peer.rows, "peer", peer.markdown),
    "chat": Scenario(_chat, _chat_rows, "chat"),
    "web": Scenario(_web, _web_rows, "web"),
    "cluster": Scenario(_cluster, cluster.rows, "cluster", cluster.markdown),
    "channels": Scenario(_channels, _channels_rows, "channels"),
    "audience": Scenario(_audience, streams.audience_rows, "streams"),
    "per-turn": Scenario(_per_turn, streams.per_turn_rows, "streams"),
}
GROUPS: dict[str, list[str]] = {
    "suite": [name for name, s in SCENARIOS.items() if s.block in ("suite", "startup", "peer")],
    "all": list(SCENARIOS),
    "foundation": ["agent-start", "first-event", "throughput"],  # the names of the first bench, kept
    "streams": ["audience", "per-turn"],
}


def expand(names: list[str]) -> list[str]:
    chosen: list[str] = []
    for name in names or ["suite"]:
        if name not in SCENARIOS and name not in GROUPS:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join([*SCENARIOS, *GROUPS])}")
        for each in GROUPS.get(name, [name]):
            if each not in chosen:
                chosen.append(each)
    return chosen


def machine() -> dict[str, Any]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "--short", "HEAD")
    # The servers run whichever corral this interpreter imports: the work tree's src/ (then say
    # whether it had uncommitted changes) or, e.g. with PYTHONPATH, an export of a commit.
    spec = importlib.util.find_spec("corral")
    corral_from = str(Path(spec.origin).resolve().parent) if spec and spec.origin else "?"
    from_tree = corral_from == str(root / "src" / "corral")
    dirty = from_tree and bool(_git(root, "status", "--porcelain", "--", "src"))
    return {"date": time.strftime("%Y-%m-%d"), "cpu_model": cpu_model, "cpus": os.cpu_count(),
            "memory_gib": memory_kb / 1024 / 1024, "python": sys.version.split()[0],
            "platform": platform.platform(terse=True), "commit": commit, "src_dirty": dirty,
            "corral_from": corral_from}


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def rows_of(results: dict[str, Any], block: str | None = None) -> list[Row]:
    out: list[Row] = []
    for name, scenario in SCENARIOS.items():
        if name in results and (block is None or scenario.block == block):
            out += scenario.rows(results[name])
    return out


BLOCK_SCENARIOS = {block: [n for n, s in SCENARIOS.items() if s.block == block]
                   for block in ("suite", "startup", "peer", "chat", "web", "cluster", "channels", "streams")}


def doc_blocks(run: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Markdown for every docs block whose scenarios all ran in this one run; and the blocks
    left as they were (a block is never assembled from several runs)."""
    results, info = run["results"], run["machine"]
    stamp = (f"Measured {machine_line(info)}, at commit `{info['commit']}`"
             f"{' (with uncommitted changes in src/)' if info['src_dirty'] else ''}, "
             f"by `python -m bench{' --quick' if run['quick'] else ''}`")
    blocks: dict[str, str] = {}
    skipped: list[str] = []
    for block, names in BLOCK_SCENARIOS.items():
        if not all(name in results for name in names):
            skipped.append(block)
            continue
        seconds = sum(run["seconds"][name] for name in names)
        note = foreign_note(run, names)
        renderers = [SCENARIOS[name].markdown for name in names]
        if all(renderers):
            body = " ".join(render(results[name]) for name, render in zip(names, renderers, strict=True) if render)
            text = f"{stamp} ({seconds / 60:.1f} min). {body}\n"
        else:
            text = f"{stamp} ({seconds / 60:.1f} min):\n\n{markdown_table(rows_of(results, block))}\n"
        blocks[block] = text + (f"\n{note}\n" if note else "")
    return blocks, skipped


def foreign_note(run: dict[str, Any], names: list[str]) -> str:
    """Which scenarios ran beside other people's load (their figures are low by that much)."""
    foreign = run.get("foreign_cpu", {})
    loaded = [f"{name} ({foreign[name]['mean_cores']:.2f} cores on average, {foreign[name]['max_cores']:.2f} at "
              "most)" for name in names if foreign.get(name, {}).get("mean_cores", 0.0) > FLAG_CORES]
    if not loaded:
        return ""
    return ("Other processes on the machine used CPU during " + ", ".join(loaded)
            + f" of its {run['machine']['cpus']} cores: those figures are skewed low.")
