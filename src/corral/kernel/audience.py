"""Live observers written to directly: the audience of one session.

A stream that can take bytes synchronously (a connection's write side, ``Sink``) is a *tap*:
when events commit, the hub writes each live tap the frames it lacks, one write per tap per
batch, with no task woken and no queue in between. Each event's frame is made once
(``Event.sse_frame``) and the bytes of a batch are joined once for all the taps at the same
position.

Flow control is the tap's own and never the run's: a tap whose sink holds more than its cap
of bytes not yet taken by the connection (``Sink.backlog``) is not written to again; it falls
*behind*, costs nothing per event from then on, and its owner's task catches it up from the
store once the connection drains. A stalled reader therefore holds at most its cap (plus one
batch) of memory, whatever the kernel's socket buffers would have taken.

Work per turn of the event loop is bounded too: a commit is written to at most ``SLICE`` taps
at once and the rest follow in later turns (``loop.call_soon``), so a thousand observers of one
session delay other sessions' work by one slice, not by a thousand writes.

A tap's states (``TapState``) and who moves it:

- ``JOINING``: its owner reads the store (``EventHub.catch_up``); the audience keeps what it
  publishes meanwhile (``recent``), so the read and the kept events leave no gap;
- ``LIVE``: the audience writes to it as events commit;
- ``BEHIND``: over its cap, or told by a hint that another node committed events: its owner
  reads the store again;
- ``FINISHED``: a run's stream got the run's terminal event; ``CLOSED``: removed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterable
from enum import Enum
from typing import Protocol

from corral.events import Event

log = logging.getLogger(__name__)

# Taps written per turn of the event loop for one commit; the rest in the next turns.
SLICE = 64
# What a sink may hold unsent before its tap falls behind (bytes).
DEFAULT_CAP = 64 * 1024
# Events kept for joining taps or for a round still under way; past this the audience drops
# the oldest and whoever still needed them reads the store instead.
MAX_RECENT = 4096


class Sink(Protocol):
    """Where a tap's bytes go (a connection's write side): synchronous and never blocking."""

    def backlog(self) -> int:
        """Bytes written and not yet taken by the connection."""
        ...

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the connection; False when the connection is gone."""
        ...


class TapState(Enum):
    JOINING = "joining"
    LIVE = "live"
    BEHIND = "behind"
    FINISHED = "finished"
    CLOSED = "closed"


class Tap:
    """One observer of a session (or of one of its runs) in its audience."""

    def __init__(self, session_id: str, sink: Sink, *, run_id: str | None = None, after: int = 0,
                 cap: int = DEFAULT_CAP):
        self.session_id = session_id
        self.sink = sink
        self.run_id = run_id
        self.cap = cap
        # Every event at or below ``last`` has been written, or was not this tap's (another run's).
        self.last = after
        self.state = TapState.JOINING
        # How many events the audience had published when this tap last began to join: what it
        # kept from there on, with a store read begun after, leaves no gap.
        self.mark = 0
        # Set when another node committed events of the session while the tap was joining.
        self.hinted = False
        self.catch_ups = 0
        self.writes = 0
        self.bytes = 0
        # Set for the owner's task: the tap fell behind, finished or was closed.
        self.wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return (f"<Tap {self.session_id}{'/' + self.run_id if self.run_id else ''} {self.state.value} "
                f"last={self.last} writes={self.writes} catch_ups={self.catch_ups}>")

    def wake(self) -> None:
        self.wakeup.set()

    def take(self, events: Iterable[Event]) -> list[Event]:
        """Of ``events`` (in seq order), those this tap still lacks, cut after its run's end."""
        wanted: list[Event] = []
        for event in events:
            if event.seq <= self.last or (self.run_id is not None and event.run_id != self.run_id):
                continue
            wanted.append(event)
            if self.run_id is not None and event.is_terminal:
                break
        return wanted

    def send(self, chunk: bytes, last: int, finished: bool) -> bool:
        """Write ``chunk`` (the frames through ``last``); False if the connection is gone."""
        if chunk and not self.sink.write(chunk):
            return False
        if chunk:
            self.writes += 1
            self.bytes += len(chunk)
        self.last = max(self.last, last)
        if finished:
            self.state = TapState.FINISHED
            self.wake()
        return True


class Audience:
    """The live taps of one session and the events published while someone needs them kept."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.taps: list[Tap] = []  # every tap but the closed, in any state
        # Events published and kept (seq order); ``dropped`` counts those let go before them.
        self.recent: list[Event] = []
        self.dropped = 0
        # A round writes every live tap what it lacks; ``cursor`` is where the next slice starts
        # in ``order`` (the live taps when it began); ``scheduled`` when a later turn continues it.
        self.order: list[Tap] = []
        self.cursor = 0
        self.scheduled = False
        # The bytes of what taps at the same position lack, joined once: (index, run) -> bytes.
        self._chunks: dict[tuple[int, str | None], tuple[bytes, int, bool]] = {}
        self.rounds = 0

    def __repr__(self) -> str:
        states: dict[str, int] = {}
        for tap in self.taps:
            states[tap.state.value] = states.get(tap.state.value, 0) + 1
        return f"<Audience {self.session_id} taps={states} recent={len(self.recent)} rounds={self.rounds}>"

    @property
    def published(self) -> int:
        return self.dropped + len(self.recent)

    def joining(self) -> bool:
        return any(tap.state is TapState.JOINING for tap in self.taps)

    def add(self, tap: Tap) -> None:
        tap.mark = self.published
        self.taps.append(tap)

    def remove(self, tap: Tap) -> None:
        tap.state = TapState.CLOSED
        if tap in self.taps:
            self.taps.remove(tap)
        self._trim()

    def rejoin(self, tap: Tap) -> None:
        """The tap's owner is about to read the store again: keep what is published from now on."""
        tap.state = TapState.JOINING
        tap.mark = self.published
        tap.hinted = False

    def publish(self, events: list[Event], loop: asyncio.AbstractEventLoop) -> None:
        """Events committed for this session: kept while needed, written to the live taps."""
        if not any(tap.state in (TapState.LIVE, TapState.JOINING) for tap in self.taps):
            self.dropped += len(events)
            return
        self.recent.extend(events)
        self._chunks.clear()
        if len(self.recent) > MAX_RECENT:
            self._drop(len(self.recent) - MAX_RECENT)
        if self.cursor == 0 and not self.scheduled:
            self._round(loop)

    def go_live(self, tap: Tap) -> bool:
        """After the owner's store read (begun once the tap joined): write what was kept since and
        go live. False if some of it was let go meanwhile (read the store again)."""
        if tap.mark < self.dropped or tap.hinted:
            self.rejoin(tap)
            return False
        tap.state = TapState.LIVE
        self._feed(tap)  # a round under way finds it at the newest seq, or serves it again at its end
        self._trim()
        return True

    def hint(self) -> None:
        """Another node committed events of this session: every tap reads the store."""
        for tap in self.taps:
            if tap.state is TapState.LIVE:
                tap.state = TapState.BEHIND
                tap.wake()
            elif tap.state is TapState.JOINING:
                tap.hinted = True

    # --- rounds --------------------------------------------------------------------------

    def _round(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the next slice of live taps; schedule the rest for the next turn of the loop."""
        if self.cursor == 0:
            self.order = [tap for tap in self.taps if tap.state is TapState.LIVE]
            self.rounds += 1
        end = min(self.cursor + SLICE, len(self.order))
        for tap in self.order[self.cursor:end]:
            if tap.state is TapState.LIVE:
                self._feed(tap)
        self.cursor = end
        if self.cursor < len(self.order):
            self._schedule(loop)
            return
        self.cursor = 0
        self.order = []
        newest = self.recent[-1].seq if self.recent else 0
        if any(tap.state is TapState.LIVE and tap.last < newest for tap in self.taps):
            self._schedule(loop)  # events came during the round: the taps served early lack them
        else:
            self._chunks.clear()
            self._trim()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._continue, loop)

    def _continue(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self._round(loop)

    def _feed(self, tap: Tap) -> None:
        """Write ``tap`` what it lacks of ``recent``, unless its sink is over its cap (then it
        falls behind) or gone (then it is closed)."""
        start = bisect.bisect_right(self.recent, tap.last, key=lambda event: event.seq)
        if start >= len(self.recent):
            return
        if tap.sink.backlog() > tap.cap:
            tap.state = TapState.BEHIND
            tap.catch_ups += 1
            tap.wake()
            return
        key = (start, tap.run_id)
        made = self._chunks.get(key)
        if made is None:
            wanted = tap.take(self.recent[start:])
            finished = bool(wanted) and tap.run_id is not None and wanted[-1].is_terminal
            last = wanted[-1].seq if finished else self.recent[-1].seq
            made = self._chunks[key] = (b"".join(event.sse_frame() for event in wanted), last, finished)
        chunk, last, finished = made
        try:
            sent = tap.send(chunk, last, finished)
        except Exception:  # a broken sink is that tap's end, never the commit's nor another tap's
            log.exception("writing to an observer failed; it is closed")
            sent = False
        if not sent:
            tap.state = TapState.CLOSED
            tap.wake()

    # --- what is kept ----------------------------------------------------------------------

    def _trim(self) -> None:
        """Let go of kept events nobody needs: no tap joining, no round under way."""
        if self.cursor or self.scheduled or not self.recent:
            return
        if self.joining():
            return
        self._drop(len(self.recent))

    def _drop(self, count: int) -> None:
        """Let go of the ``count`` oldest kept events; a live tap that still lacked one of them
        falls behind (it reads the store), and a joining tap that needed them joins again."""
        if count <= 0:
            return
        cut = self.recent[count - 1].seq
        for tap in self.taps:
            if tap.state is TapState.LIVE and tap.last < cut and tap.take(self.recent[:count]):
                tap.state = TapState.BEHIND
                tap.catch_ups += 1
                tap.wake()
        del self.recent[:count]
        self.dropped += count
        self._chunks.clear()
