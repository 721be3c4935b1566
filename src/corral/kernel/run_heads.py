"""The opening events of young runs, kept whole in memory.

A client that posts a message and then follows the run's stream (``GET /v1/runs/{id}/events``)
joins a run that has only just begun: what it lacks is the run's first few events. Kept here
from the run's creation, they are written to the new stream at once, with no store read (a read
is a hop to a reader thread and back, with the GIL handed over at every step of the query; in
the per-turn benchmark it was the largest single cost of a run's stream).

A run is tracked from its creation in this process, before any event of it commits, so its
head is whole: every event of the run, in seq order, as this node committed them. A head is let
go at the run's terminal event (an ended run's stream is a replay from the store), once it would
hold more than ``max_events`` (a long run's late joiners read the store, as before), when more
than ``max_runs`` runs are tracked (oldest first), and when another node commits events of its
session (a hint: the store then knows more than this node).
"""

from __future__ import annotations

from corral.events import Event

HEAD_EVENTS = 64
MAX_RUNS = 1024


class RunHeads:
    def __init__(self, max_events: int = HEAD_EVENTS, max_runs: int = MAX_RUNS):
        self.max_events = max_events
        self.max_runs = max_runs
        self._heads: dict[str, tuple[str, list[Event]]] = {}  # run id -> (session id, events)

    def __repr__(self) -> str:
        return f"<RunHeads runs={len(self._heads)}>"

    def __len__(self) -> int:
        return len(self._heads)

    def track(self, run_id: str, session_id: str) -> None:
        """A run just created here, none of whose events has committed yet."""
        self._heads[run_id] = (session_id, [])
        if len(self._heads) > self.max_runs:
            del self._heads[next(iter(self._heads))]

    def add(self, events: list[Event]) -> None:
        """Events just committed (in seq order): each joins its run's head, if kept."""
        if not self._heads:
            return
        for event in events:
            head = self._heads.get(event.run_id) if event.run_id is not None else None
            if head is None:
                continue
            if event.is_terminal or len(head[1]) >= self.max_events:
                del self._heads[event.run_id]  # type: ignore[arg-type]
            else:
                head[1].append(event)

    def after(self, run_id: str, seq: int) -> list[Event] | None:
        """The run's events after ``seq``, every one of them; None when its head is not kept."""
        head = self._heads.get(run_id)
        if head is None:
            return None
        return [event for event in head[1] if event.seq > seq]

    def forget(self, run_id: str) -> None:
        """A run that never came to be (its accepting write failed)."""
        self._heads.pop(run_id, None)

    def forget_session(self, session_id: str) -> None:
        for run_id in [run_id for run_id, (owner, _) in self._heads.items() if owner == session_id]:
            del self._heads[run_id]
