"""`python -m bench [NAME ...] [--quick] [--write-docs]`: run benchmarks, print a table, write JSON.

Names: throughput, first-event, isolation, fanout, idle, agent-start, stop, recovery, startup,
peer, chat, web, cluster, channels, audience, per-turn; groups: `suite` (the default: the first
ten), `all` (every one), `foundation`, `streams` (audience and per-turn). Each scenario starts its
own `corral serve` on loopback with a fresh SQLite file and drives it from separate processes;
`cluster` starts 1 to 3 nodes on a new database of the local Postgres server (`CORRAL_TEST_PG`'s,
127.0.0.1:5432 by default) per configuration.
`--quick` runs every scenario small (about 3 minutes for the suite, against about 12; `cluster`
about 2 against about 4); `--write-docs` regenerates docs/benchmarks.md's tables from this run;
`--from-json FILE` regenerates them from a saved run instead of running anything.
(`python -m bench.web --screenshot` writes docs/screenshot-chat.png.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.monitor import FLAG_CORES, ForeignLoad
from bench.report import console_table, write_doc
from bench.suite import SCENARIOS, Options, doc_blocks, expand, foreign_note, machine, rows_of

RESULTS = Path(__file__).parent / "results"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="scenarios or groups (default: suite)")
    parser.add_argument("--quick", action="store_true", help="every scenario small: a fast pass")
    parser.add_argument("--write-docs", action="store_true", help="regenerate docs/benchmarks.md's tables")
    parser.add_argument("--from-json", type=Path, help="render the docs from this saved run; run nothing")
    parser.add_argument("--idle-sessions", type=int, help="sessions for the idle scale (100,000; quick 5,000)")
    parser.add_argument("--generators", type=int, help="load-generator processes (default 2)")
    return parser.parse_args(argv)


async def _run(names: list[str], options: Options) -> dict[str, Any]:
    run: dict[str, Any] = {"machine": machine(), "quick": options.quick, "results": {}, "seconds": {},
                           "foreign_cpu": {}}
    for name in names:
        print(f"--- {name}", flush=True)
        began = time.monotonic()
        async with ForeignLoad() as foreign:
            results = await SCENARIOS[name].run(options)
        run["seconds"][name] = time.monotonic() - began
        run["results"][name] = results
        run["foreign_cpu"][name] = foreign.result()
        print(console_table(rows_of({name: results})), flush=True)
        if foreign.result()["mean_cores"] > FLAG_CORES:
            print(f"WARNING: {foreign_note(run, [name])}", flush=True)
    return run


def _write_docs(run: dict[str, Any]) -> None:
    blocks, skipped = doc_blocks(run)
    if blocks:
        write_doc(blocks)
        print(f"docs/benchmarks.md: rewrote {', '.join(blocks)}")
    if skipped:
        print(f"docs/benchmarks.md: left {', '.join(skipped)} as they were (not every scenario of theirs ran)")


def main(argv: list[str] | None = None) -> None:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        _write_docs(json.loads(args.from_json.read_text()))
        return
    try:
        names = expand(args.names)
    except ValueError as exc:
        sys.exit(str(exc))
    options = Options(quick=args.quick, idle_sessions=args.idle_sessions, generators=args.generators)
    began = time.monotonic()
    run = asyncio.run(_run(names, options))
    print(f"\n=== {len(names)} scenario(s) in {(time.monotonic() - began) / 60:.1f} min\n")
    print(console_table(rows_of(run["results"])))
    if note := foreign_note(run, names):
        print(f"\nWARNING: {note}")
    RESULTS.mkdir(exist_ok=True)
    label = "-".join(args.names) if args.names else "suite"
    path = RESULTS / f"{label}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(run, indent=2))
    print(f"\nwrote {path}")
    if args.write_docs:
        _write_docs(run)


if __name__ == "__main__":
    main()
