"""Compaction: a session past its agent's token budget has older turns summarised; it still answers."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import sqlalchemy as sa

from corral.kernel import Kernel
from corral.kernel.conversations import StoredMessage
from corral.loop.compaction import choose_cut, estimate_tokens
from corral.providers.base import ChatMessage
from corral.specs import AgentSpec
from corral.store import repo
from corral.store import tables as t
from tests.helpers import new_session, run_events, select_scalar, wait_run

LIMIT = 30
WORDS = " ".join(f"word{i}" for i in range(60))  # about 120 estimated tokens per message


def rows_of(*runs: tuple[str, int]) -> list[StoredMessage]:
    """Rows of runs, each (run id, number of user+assistant pairs), with increasing ids."""
    rows: list[StoredMessage] = []
    for run_id, pairs in runs:
        for _ in range(pairs):
            for role in ("user", "assistant"):
                rows.append(StoredMessage.from_row(SimpleNamespace(
                    id=len(rows) + 1, run_id=run_id, role=role, content=WORDS, tool_calls=None, tool_call_id=None)))
    return rows


def test_the_cut_falls_on_a_run_boundary_and_never_inside_the_current_run() -> None:
    rows = rows_of(("r1", 1), ("r2", 1), ("r3", 1), ("r4", 1))
    cut = choose_cut(rows, "r4", budget=600, fixed=[])
    assert cut is not None
    assert rows[cut.index].run_id != rows[cut.index - 1].run_id  # at a boundary
    assert cut.through_message_id == rows[cut.index - 1].id
    kept = rows[cut.index:]
    assert all(r.run_id in {"r3", "r4"} for r in kept) and kept[-1].run_id == "r4"
    # A budget too small for even the current run still cuts only up to it.
    tight = choose_cut(rows, "r4", budget=10, fixed=[])
    assert tight is not None and rows[tight.index].run_id == "r4" and rows[tight.index - 1].run_id == "r3"
    # Nothing older than the current run: nothing to compact.
    assert choose_cut(rows_of(("r1", 3)), "r1", budget=10, fixed=[]) is None


def test_the_estimate_grows_with_content() -> None:
    short, long = [ChatMessage("user", "hi")], [ChatMessage("user", WORDS)]
    assert estimate_tokens(short) < estimate_tokens(long)
    assert 100 < estimate_tokens(long) < 200


async def test_a_long_session_is_compacted_and_still_answers(kernel: Kernel) -> None:
    async with asyncio.timeout(LIMIT):
        await kernel.agents.create(AgentSpec(name="brief", context_budget_tokens=700, system_prompt="be brief"))
        await kernel.agents.wait_ready("brief")
        session = await new_session(kernel, "brief")
        compactions = []
        for turn in range(8):
            accepted = await kernel.submit(session, f"turn {turn}: {WORDS}")
            events = await run_events(kernel, accepted.run_id)
            compactions += [e for e in events if e.type == "context.compacted"]
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
        assert len(compactions) >= 2  # it happened, and more than once: summaries roll forward
        first = compactions[0].data
        assert first["tokens_before"] > 700 >= first["tokens_after"]

        recall = await kernel.submit(session, "/recall")
        compactions += [e for e in await run_events(kernel, recall.run_id) if e.type == "context.compacted"]
        run = await wait_run(kernel, recall.run_id)
        remembered = json.loads(run["output"].removeprefix("recall: "))
        assert "turn 0" not in " ".join(remembered)  # summarised away from the context...
        assert any("turn 7" in text for text in remembered)  # ...while recent turns stay verbatim

        everything = await kernel.store.read(repo.session_messages, session, include_rolled_back=True)
        latest = await kernel.store.read(repo.latest_compaction, session)
        count = await select_scalar(kernel.store, sa.select(sa.func.count()).select_from(t.compactions))
        assert sum(1 for m in everything if m.role == "user") == 9  # the store keeps every message
        assert latest is not None and count == len(compactions)
        assert "user said: turn 0" in latest.summary  # the oldest turn lives on in the rolled-forward summary
