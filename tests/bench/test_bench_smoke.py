"""The benchmark code keeps working: a tiny throughput run against a real server (no-op
ceiling, load-generator process, turns over SSE, rows) and the doc's generated blocks."""

from __future__ import annotations

from pathlib import Path

from bench.report import Row, markdown_table, replace_block, write_doc

from bench import throughput


async def test_a_tiny_throughput_run_against_a_real_server() -> None:
    plan = throughput.Plan(generators=1, warmup_s=0.2, measure_s=1.0, repeats=1, configs=((0, 4, 4),),
                           noop_connections=4)
    results = await throughput.run(plan)
    assert results["noop"]["requests_per_s"] > 0
    (config,) = results["configs"]
    assert config["turns_per_s"] > 0 and config["latency"]["n"] == config["turns"] > 0
    rows = throughput.rows(results)
    assert [row.met for row in rows] == [None, None]  # 4 sessions is no configuration with a target
    assert "turns/s" in markdown_table(rows)


def test_generated_blocks_replace_only_their_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n<!-- bench:suite:start -->\nold\n<!-- bench:suite:end -->\n\n## What limits\nprose\n")
    write_doc({"suite": markdown_table([Row("x", "1 | 2", "≤ 3", True)])}, doc)
    text = doc.read_text()
    assert "old" not in text and "| x | 1 / 2 | ≤ 3 | met |" in text and text.endswith("## What limits\nprose\n")
    assert replace_block("a", "peer", "b") == "a\n\n<!-- bench:peer:start -->\nb\n<!-- bench:peer:end -->\n"
