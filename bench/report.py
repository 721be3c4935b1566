"""Rows of results, printed as a console table and rendered into docs/benchmarks.md.

Each scenario turns its JSON results into `Row`s; the same rows make the console table and
the markdown, so the doc is always regenerated from one run's JSON, never typed by hand.
Only the blocks between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers
are rewritten; the prose around them (e.g. "What limits throughput today") is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Row:
    scenario: str
    result: str
    target: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: ""}[self.met]


def _plain(text: str) -> str:
    return text.replace("**", "").replace("`", "")


def console_table(rows: list[Row]) -> str:
    width = max(len(_plain(row.scenario)) for row in rows)
    lines = [f"{'scenario'.ljust(width)}  result"]
    lines.append(f"{'-' * width}  {'-' * 40}")
    for row in rows:
        check = "" if row.met is None else f"   [{'met' if row.met else 'MISSED'}: {_plain(row.target)}]"
        lines.append(f"{_plain(row.scenario).ljust(width)}  {_plain(row.result)}{check}")
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| scenario | result | target | |", "| --- | --- | --- | --- |"]
    lines += [f"| {row.scenario} | {row.result.replace('|', '/')} | {row.target} | {row.verdict} |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['date']} on {machine['cpu_model']} ({machine['cpus']} cores, "
            f"{machine['memory_gib']:.0f} GiB), Python {machine['python']}, {machine['platform']}")


def replace_block(text: str, name: str, body: str) -> str:
    """Swap the content between a block's markers; appends the block if the doc lacks it."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + "\n\n" + block + "\n"


def write_doc(blocks: dict[str, str], doc: Path = DOC) -> None:
    text = doc.read_text()
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    doc.write_text(text)
