"""The history checker: reads back what the database holds (runs, inputs, events, messages)
and lists every violation of the invariants a cluster must keep, as sentences (empty: pass).

Each violation starts with its rule's tag, so a test can look for one kind:

- ``carried``: every accepted input is carried by exactly one run that ended ``completed``,
  ``cancelled`` or ``failed``, possibly after being re-queued (``input.requeued``) from runs
  that ended first; none is left ``pending`` on a run that has ended, none is lost;
- ``overlap``: per session, at most one run is active at a time, by the event log (no
  ``run.started`` while another started run has no terminal event) and by the runs'
  ``started_at``/``ended_at`` intervals;
- ``order``: per session, runs start in the order of their first input's seq, modes aside: runs
  opened by an ``interrupt`` or ``rollback`` message or by a steer that outlived its run stand
  before ordinary work by design (docs/concurrency.md, "Arrival modes"), and a run that ended
  ``interrupted`` is stood for by the run its inputs moved to;
- ``seq``: per session, event seqs are 1..n with no gap and no duplicate;
- ``observer``: every observer saw every event of its session after the seq it started from,
  once each, in order, with the stored type and run;
- ``twice``: no input was executed by two runs: its user message lives under at most one run
  whose messages were not rolled back;
- ``events``: a run's events agree with its row (at most one ``run.started``, one terminal event
  matching a terminal status) and, once ``settled``, no run is left unfinished.

The single-node tests state the same rules with asserts in ``tests/kernel/test_invariants.py``
(``check_one_active_at_a_time``, ``start_order_by_input_seq``); here they are re-stated to
return sentences about a whole database instead of failing at the first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corral.store import Store
from corral.store import tables as t
from corral.types import TERMINAL_EVENT, RunStatus

TERMINAL = {status.value for status in RunStatus if status.is_terminal}
TERMINAL_TYPES = {event.value for event in TERMINAL_EVENT.values()}
CARRIED_TO_THE_END = {RunStatus.COMPLETED.value, RunStatus.CANCELLED.value, RunStatus.FAILED.value}
URGENT_MODES = {"interrupt", "rollback"}  # their runs stand before queued work on purpose
Row = dict[str, Any]


# --- what the clients and observers saw ---------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """One 202 answer to ``POST /v1/sessions/{id}/messages``: the input is durable."""

    input_id: str
    run_id: str
    session_id: str
    disposition: str
    mode: str = "queue"
    node: int | None = None  # the harness's index of the node the client sent it to
    served_by: str | None = None  # the answer's ``x-corral-node``, when the server names itself
    sent_at: datetime | None = None
    answered_at: datetime | None = None


@dataclass(frozen=True)
class Seen:
    """One event as an observer received it."""

    seq: int
    type: str
    run_id: str | None
    node: int | None = None


@dataclass(frozen=True)
class Observation:
    """What one observer of a session received, having started after seq ``after``."""

    session_id: str
    after: int
    seen: tuple[Seen, ...]
    label: str = "observer"


# --- the history, read back --------------------------------------------------------------


@dataclass
class History:
    """Rows of the four tables, by session; events and inputs in seq order, messages by id."""

    runs: dict[str, Row] = field(default_factory=dict)  # run id -> row
    inputs: dict[str, Row] = field(default_factory=dict)  # input id -> row
    events: dict[str, list[Row]] = field(default_factory=lambda: defaultdict(list))  # session -> rows
    messages: list[Row] = field(default_factory=list)

    @property
    def sessions(self) -> set[str]:
        return ({r["session_id"] for r in self.runs.values()} | {r["session_id"] for r in self.inputs.values()}
                | set(self.events))

    def last_seq(self, session_id: str) -> int:
        log = self.events.get(session_id, [])
        return int(log[-1]["seq"]) if log else 0


def _read(conn: Connection, sessions: list[str] | None) -> History:
    def rows(table: sa.Table, *order: Any) -> list[Row]:
        query = sa.select(table).order_by(*order)
        if sessions is not None:
            query = query.where(table.c.session_id.in_(sessions))
        return [dict(row._mapping) for row in conn.execute(query)]

    history = History()
    history.runs = {r["id"]: r for r in rows(t.runs, t.runs.c.created_at, t.runs.c.position)}
    history.inputs = {r["id"]: r for r in rows(t.inputs, t.inputs.c.session_id, t.inputs.c.seq)}
    for event in rows(t.events, t.events.c.session_id, t.events.c.seq):
        history.events[event["session_id"]].append(event)
    history.messages = rows(t.messages, t.messages.c.id)
    return history


async def load_history(database_url: str, sessions: Iterable[str] | None = None) -> History:
    """Every run, input, event and message of ``sessions`` (default: all), in one read."""
    store = Store(database_url)
    try:
        return await store.read(_read, None if sessions is None else sorted(set(sessions)))
    finally:
        await store.aclose()


async def check_history(database_url: str, accepted: Sequence[Accepted] = (),
                        observations: Sequence[Observation] = (), *, sessions: Iterable[str] | None = None,
                        settled: bool = True) -> list[str]:
    """Read the database's history back and list its violations (empty: the history is sound)."""
    chosen = None if sessions is None else set(sessions)
    history = await load_history(database_url, chosen)
    if chosen is not None:
        accepted = [a for a in accepted if a.session_id in chosen]
        observations = [o for o in observations if o.session_id in chosen]
    return find_violations(history, accepted, observations, settled=settled)


def find_violations(history: History, accepted: Sequence[Accepted] = (),
                    observations: Sequence[Observation] = (), *, settled: bool = True) -> list[str]:
    """Every rule of the module's docstring over ``history``. ``settled``: the workload is over, so
    every run must have ended and every observer must have seen its session's last event."""
    out: list[str] = []
    out += check_run_events(history, settled=settled)
    out += check_inputs_carried(history, accepted, settled=settled)
    out += check_executed_once(history)
    for session_id in sorted(history.sessions):
        out += check_one_active(history, session_id)
        out += check_start_order(history, session_id)
        out += check_seq(history, session_id)
    for observation in observations:
        out += check_observer(history, observation, settled=settled)
    return out


# --- the rules -------------------------------------------------------------------------------


def _inputs_named(event: Row) -> list[str]:
    data = event["data"] or {}
    if event["type"] == "run.steered":
        return [data["input_id"]] if "input_id" in data else []
    return list(data.get("input_ids", []))


def check_run_events(history: History, *, settled: bool = True) -> list[str]:
    """A run's events agree with its row; once settled, every run has ended."""
    out = []
    started: dict[str, int] = defaultdict(int)
    terminal: dict[str, list[str]] = defaultdict(list)
    for log in history.events.values():
        for event in log:
            if event["type"] == "run.started":
                started[event["run_id"]] += 1
            elif event["type"] in TERMINAL_TYPES:
                terminal[event["run_id"]].append(event["type"])
    for run_id, run in history.runs.items():
        status = run["status"]
        if settled and status not in TERMINAL:
            out.append(f"events: run {run_id} of session {run['session_id']} is still {status}")
        if started[run_id] > 1:
            out.append(f"events: run {run_id} has {started[run_id]} run.started events")
        if (started[run_id] > 0) != (run["started_at"] is not None):
            out.append(f"events: run {run_id} has {started[run_id]} run.started events "
                       f"but started_at {run['started_at']}")
        ends = terminal.get(run_id, [])
        if status in TERMINAL and ends != [f"run.{status}"]:
            out.append(f"events: run {run_id} ended {status} but its terminal events are {ends}")
        if status not in TERMINAL and ends:
            out.append(f"events: run {run_id} is {status} but has terminal events {ends}")
    for run_id in sorted(set(started) | set(terminal)):
        if run_id not in history.runs:
            out.append(f"events: events name run {run_id}, which has no row")
    return out


def _moves(history: History) -> tuple[dict[tuple[str, str], str], list[str]]:
    """(from run, input) -> the run an ``input.requeued`` event moved the input to."""
    moves: dict[tuple[str, str], str] = {}
    out = []
    for log in history.events.values():
        for event in log:
            if event["type"] != "input.requeued":
                continue
            data = event["data"] or {}
            for input_id in data.get("input_ids", []):
                key = (data.get("from_run_id", ""), input_id)
                target = str(data.get("run_id") or event["run_id"])
                if key in moves and moves[key] != target:
                    out.append(f"carried: input {input_id} was re-queued from run {key[0]} twice, "
                               f"to {moves[key]} and to {target}")
                moves[key] = target
    return moves, out


def _chain(input_id: str, start: str, moves: dict[tuple[str, str], str]) -> list[str]:
    chain = [start]
    while (chain[-1], input_id) in moves and len(chain) <= len(moves):
        chain.append(moves[(chain[-1], input_id)])
    return chain


def _named_by(history: History) -> dict[str, dict[str, set[str]]]:
    """input id -> {event type -> the runs whose events of that type name the input}."""
    named: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for log in history.events.values():
        for event in log:
            if event["type"] in ("run.queued", "run.started", "run.steered"):
                for input_id in _inputs_named(event):
                    named[input_id][event["type"]].add(event["run_id"])
    return named


def check_inputs_carried(history: History, accepted: Sequence[Accepted] = (), *, settled: bool = True) -> list[str]:
    """Every input (each accepted one, and whatever else the database holds) went down one chain
    of runs, handed on only by ``input.requeued``, to one run that ended completed, cancelled or
    failed; no run outside its chain took it; no accepted input is missing."""
    moves, out = _moves(history)
    named = _named_by(history)
    answered = {a.input_id: a for a in accepted}
    for a in accepted:
        row = history.inputs.get(a.input_id)
        where = f"(202 from node {a.node}, {a.disposition} into run {a.run_id})"
        if row is None:
            out.append(f"carried: input {a.input_id} of session {a.session_id} was accepted {where} "
                       f"but is not in the database")
        elif row["session_id"] != a.session_id:
            out.append(f"carried: input {a.input_id} was accepted for session {a.session_id} "
                       f"but is stored under {row['session_id']}")
    for input_id, row in history.inputs.items():
        froms = {f for (f, i) in moves if i == input_id}
        tos = {to for (f, i), to in moves.items() if i == input_id}
        starts = sorted(froms - tos) or [row["run_id"]]
        if input_id in answered:
            starts = [answered[input_id].run_id]
        elif len(starts) > 1:
            out.append(f"carried: input {input_id} was re-queued from several unrelated runs {starts}")
        chain = _chain(input_id, starts[0], moves)
        if chain[-1] != row["run_id"]:
            out.append(f"carried: input {input_id}'s row names run {row['run_id']} but its chain of "
                       f"re-queues from run {starts[0]} ends at {chain[-1]} ({' -> '.join(chain)})")
        stray = {run for runs in named[input_id].values() for run in runs} - set(chain) - {row["run_id"]}
        if stray:
            out.append(f"carried: input {input_id} appears in runs {sorted(stray)} outside its chain {chain}")
        final = history.runs.get(row["run_id"])
        if final is None:
            out.append(f"carried: input {input_id} names run {row['run_id']}, which has no row")
            continue
        taken = named[input_id]["run.started"] | named[input_id]["run.steered"]
        for run_id in chain[:-1]:
            handed_on = history.runs.get(run_id)
            status = None if handed_on is None else handed_on["status"]
            if settled and status not in TERMINAL:
                out.append(f"carried: input {input_id} was re-queued from run {run_id}, which is {status}")
            if run_id in taken and status != RunStatus.INTERRUPTED.value:
                out.append(f"carried: input {input_id} was taken by run {run_id} ({status}) and yet re-queued "
                           f"to {chain[chain.index(run_id) + 1]}")
        if final["status"] in TERMINAL:
            if final["status"] not in CARRIED_TO_THE_END:
                out.append(f"carried: input {input_id} ends on run {final['id']}, which ended {final['status']} "
                           f"and handed it to no other run")
            if row["status"] == "pending":
                out.append(f"carried: input {input_id} is left pending on run {final['id']}, "
                           f"which ended {final['status']}")
        elif settled:
            out.append(f"carried: input {input_id} ends on run {final['id']}, still {final['status']}")
    return out


def check_executed_once(history: History) -> list[str]:
    """Each input's user message lives under at most one run whose messages stand (not rolled back),
    and a completed run holds the user message of every input it carried."""
    out = []
    live: dict[str, set[str]] = defaultdict(set)
    for message in history.messages:
        if message["role"] == "user" and message["input_id"] is not None and not message["rolled_back"]:
            live[message["input_id"]].add(message["run_id"])
    for input_id, runs in sorted(live.items()):
        if len(runs) > 1:
            out.append(f"twice: input {input_id} was executed by runs {sorted(runs)} (none rolled back)")
    for input_id, row in history.inputs.items():
        run = history.runs.get(row["run_id"])
        if run is not None and run["status"] == RunStatus.COMPLETED.value and row["run_id"] not in live[input_id]:
            out.append(f"twice: input {input_id}'s run {row['run_id']} completed without its user message")
    return out


def check_one_active(history: History, session_id: str) -> list[str]:
    """At most one active run at a time: by the log's order, and by the stored time intervals."""
    out = []
    active: str | None = None
    started: set[str] = set()
    for event in history.events.get(session_id, []):
        if event["type"] == "run.started":
            if active is not None:
                out.append(f"overlap: session {session_id}: run {event['run_id']} started (seq {event['seq']}) "
                           f"while run {active} was active")
            active = event["run_id"]
            started.add(event["run_id"])
        elif event["type"] in TERMINAL_TYPES and event["run_id"] in started:
            if event["run_id"] != active:
                out.append(f"overlap: session {session_id}: run {event['run_id']} ended (seq {event['seq']}) "
                           f"while run {active} was the active one")
            else:
                active = None
    ran = sorted((r for r in history.runs.values() if r["session_id"] == session_id and r["started_at"] is not None),
                 key=lambda r: (r["started_at"], r["ended_at"] is None))
    for earlier, later in zip(ran, ran[1:], strict=False):
        if earlier["ended_at"] is None:
            out.append(f"overlap: session {session_id}: run {later['id']} started at {later['started_at']} "
                       f"while run {earlier['id']} (started {earlier['started_at']}) has not ended")
        elif earlier["ended_at"] > later["started_at"]:
            out.append(f"overlap: session {session_id}: runs {earlier['id']} "
                       f"[{earlier['started_at']}, {earlier['ended_at']}] and {later['id']} "
                       f"[{later['started_at']}, {later['ended_at']}] overlap in time")
    return out


def check_start_order(history: History, session_id: str) -> list[str]:
    """Ordinary runs start in the order of their first input's seq (see the module docstring for the
    runs that stand before them on purpose)."""
    first_input: dict[str, Row] = {}
    for event in history.events.get(session_id, []):
        if event["type"] == "run.started":
            rows = [history.inputs[i] for i in _inputs_named(event) if i in history.inputs]
            if rows:
                first_input[event["run_id"]] = min(rows, key=lambda r: r["seq"])
    ordinary = []
    for run in history.runs.values():
        first = first_input.get(run["id"])
        if (run["session_id"] != session_id or run["started_at"] is None or first is None
                or run["status"] == RunStatus.INTERRUPTED.value
                or first["mode"] in URGENT_MODES or first["disposition"] == "steered"):
            continue
        ordinary.append((run["started_at"], first["seq"], run["id"]))
    ordinary.sort()
    return [f"order: session {session_id}: run {later_run} (first input seq {later_seq}) started after run "
            f"{earlier_run} (first input seq {earlier_seq})"
            for (_, earlier_seq, earlier_run), (_, later_seq, later_run) in zip(ordinary, ordinary[1:], strict=False)
            if later_seq <= earlier_seq]


def check_seq(history: History, session_id: str) -> list[str]:
    """The session's event seqs are exactly 1..n."""
    seqs = [int(e["seq"]) for e in history.events.get(session_id, [])]
    if seqs == list(range(1, len(seqs) + 1)):
        return []
    expected = set(range(1, max(seqs) + 1))
    missing = sorted(expected - set(seqs))
    duplicated = sorted({s for s in seqs if seqs.count(s) > 1})
    return [f"seq: session {session_id}: event seqs are not 1..{max(seqs)}: missing {missing[:20]}"
            + (f", duplicated {duplicated[:20]}" if duplicated else "")]


def check_observer(history: History, observation: Observation, *, settled: bool = True) -> list[str]:
    """The observer saw each stored event after its start once, in order, as stored."""
    session_id, label = observation.session_id, observation.label
    stored = {int(e["seq"]): e for e in history.events.get(session_id, [])}
    last = history.last_seq(session_id)
    out = []
    expect = observation.after + 1
    for seen in observation.seen:
        if seen.seq < expect:
            out.append(f"observer: {label} of session {session_id} got seq {seen.seq} again or out of order "
                       f"(expected {expect})")
            continue
        if seen.seq > expect:
            out.append(f"observer: {label} of session {session_id} missed seqs {expect}..{seen.seq - 1}")
        event = stored.get(seen.seq)
        if event is None:
            out.append(f"observer: {label} of session {session_id} got seq {seen.seq}, "
                       f"which the database does not hold (last {last})")
        elif (event["type"], event["run_id"]) != (seen.type, seen.run_id):
            out.append(f"observer: {label} of session {session_id} got seq {seen.seq} as {seen.type} of "
                       f"{seen.run_id}, stored as {event['type']} of {event['run_id']}")
        expect = seen.seq + 1
    if settled and expect <= last:
        out.append(f"observer: {label} of session {session_id} saw up to seq {expect - 1} of {last}")
    return out
