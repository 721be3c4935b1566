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

Work per turn of the event loop is bounded too: a commit is written to its taps for at most
about ``SLICE_S`` (2 ms) at once, and the next slice (or the next round, if events came
meanwhile) waits until the loop has had eight times that slice's time for other work
(``PACE``), so a thousand observers of one session take at most a ninth of the loop however
slow their writes are, and the events that commit meanwhile go out together in fewer writes:
a round's pause grows with its audience, never for a session with a few observers.

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
import time
from collections.abc import Iterable
from enum import Enum
from typing import Protocol

from corral.events import Event

log = logging.getLogger(__name__)

# A commit is written to its taps for at most about this long per turn of the event loop (in
# groups of SLICE taps, at least one group); the rest in later turns.
SLICE_S = 0.002
SLICE = 16
# What a sink may hold unsent before its tap falls behind (bytes).
DEFAULT_CAP = 32 * 1024
# After a slice of writes, the loop gets this many times the slice's time for other work first.
# Measured beside 1,000 readers (docs/benchmarks.md): at 2, other sessions' turns took x2.5-2.9
# their time alone; at 8, x1.9-2.0, with as many deliveries a second (fewer, larger writes).
PACE = 8.0
# Events kept for joining taps or for a round still under way; past this the audience drops
# the oldest and whoever still needed them reads the store instead.
MAX_RECENT = 4096
# Every event is kept at least this long after it is published (within MAX_RECENT), so that an
# observer attaching a little behind the end (a page that has just read the session) goes live
# from memory: a thousand such observers each reading the store, and each encoding what it read,
# took seconds, with the event loop busy all along (docs/benchmarks.md, audience).
TAIL_S = 2.0


class Sink(Protocol):
    """Where a tap's bytes go (a connection's write side): synchronous and never blocking."""

    def backlog(self) -> int:
        """Bytes written and not yet taken by the connection."""
        ...

    def write(self, data: bytes, *, final: bool = False) -> bool:
        """Queue ``data`` for the connection; False when the connection is gone. ``final``: only
        the stream's end follows, so the sink may hold these bytes to send them with it."""
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
        self.audience: Audience | None = None  # set once added; told of every change of state
        self._state = TapState.JOINING
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

    @property
    def state(self) -> TapState:
        return self._state

    @state.setter
    def state(self, new: TapState) -> None:
        old, self._state = self._state, new
        if self.audience is not None and old is not new:
            self.audience.moved(self, old, new)

    @property
    def kept(self) -> bool:
        """Behind, and the audience still keeps every event after ``last``: once its connection
        drains it goes live from there, with no store read."""
        return self.audience is not None and self in self.audience.keeping

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
        if chunk and not self.sink.write(chunk, final=finished):
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

    def __init__(self, session_id: str, *, tail_s: float = TAIL_S):
        self.session_id = session_id
        self.taps: list[Tap] = []  # every tap but the closed, in any state
        # The taps a commit concerns, by state, kept exact by ``moved``: joining, live, and behind
        # with every event after their ``last`` still kept. A tap behind whose events were let go
        # is in none of them, so a stalled observer costs a commit nothing, however many there are.
        self.joining: dict[Tap, None] = {}
        self.live: dict[Tap, None] = {}
        self.keeping: dict[Tap, None] = {}
        # The lowest ``last`` of ``keeping`` (None: to be found again). A tap behind is not written
        # to, so its ``last`` stands still: this changes only as taps enter or leave ``keeping``.
        self._keeping_low: int | None = None
        # Events published and kept (seq order); ``dropped`` counts those let go before them.
        self.recent: list[Event] = []
        self._published_at: list[float] = []  # when each of ``recent`` was published (monotonic)
        self.dropped = 0
        self.tail_s = tail_s
        self._expiry: asyncio.TimerHandle | None = None
        # Every event of the session after this seq is in ``recent`` or yet to be published here
        # (None: not known, before the first publish or after another node committed): a tap
        # joining at or past it needs no store read.
        self.kept_after: int | None = None
        self.max_recent = MAX_RECENT
        self.slice_s = SLICE_S
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

    def moved(self, tap: Tap, old: TapState, new: TapState) -> None:
        if old is TapState.JOINING:
            self.joining.pop(tap, None)
        elif old is TapState.LIVE:
            self.live.pop(tap, None)
        elif old is TapState.BEHIND:
            self._unkeep(tap)
        if new is TapState.JOINING:
            self.joining[tap] = None
        elif new is TapState.LIVE:
            self.live[tap] = None

    def listening(self) -> bool:
        """Whether some tap needs what is published now: live, joining, or behind on kept events."""
        return bool(self.joining or self.live or self.keeping)

    def add(self, tap: Tap) -> None:
        tap.mark = self.published
        tap.audience = self
        self.taps.append(tap)
        self.moved(tap, TapState.CLOSED, tap.state)

    def remove(self, tap: Tap) -> None:
        tap.state = TapState.CLOSED
        tap.audience = None
        if tap in self.taps:
            self.taps.remove(tap)

    def rejoin(self, tap: Tap) -> None:
        """The tap's owner is about to read the store again: keep what is published from now on."""
        tap.state = TapState.JOINING
        tap.mark = self.published
        tap.hinted = False

    def publish(self, events: list[Event], loop: asyncio.AbstractEventLoop) -> None:
        """Events committed for this session: kept while needed, written to the live taps."""
        if not self.listening():
            self.dropped += len(events)
            self.kept_after = events[-1].seq
            return
        if self.kept_after is None:
            self.kept_after = events[0].seq - 1
        self.recent.extend(events)
        self._published_at.extend([time.monotonic()] * len(events))
        self._chunks.clear()
        if len(self.recent) > self.max_recent:
            self._drop(len(self.recent) - self.max_recent)
        if self.cursor == 0 and not self.scheduled:
            self._round(loop)

    def resume(self, tap: Tap) -> bool:
        """A tap behind whose connection drained: live again from what was kept for it (no store
        read), or False if that was let go (it joins again: its owner reads the store)."""
        if not tap.kept or tap.hinted:
            self.rejoin(tap)
            return False
        tap.state = TapState.LIVE
        self._feed(tap)
        return True

    def join_from_memory(self, tap: Tap) -> bool:
        """A joining tap that lacks nothing the audience let go (it joins at the session's end, as
        a page that has just read the session does): live at once from what is kept, with no
        store read. False if it must read the store first."""
        if tap.state is not TapState.JOINING or tap.hinted or self.kept_after is None or tap.last < self.kept_after:
            return False
        tap.state = TapState.LIVE
        self._feed(tap)
        self._trim()
        return True

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
        self.kept_after = None  # those events were never published here
        for tap in self.taps:
            if tap.state is TapState.LIVE:
                tap.state = TapState.BEHIND
                tap.wake()
            if tap.state in (TapState.JOINING, TapState.BEHIND):
                tap.hinted = True

    # --- rounds --------------------------------------------------------------------------

    def _round(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the next slice of live taps; the rest after the loop has had ``PACE`` times this
        slice's time for everything else (a large audience takes at most a ninth of the loop, and
        the events that come meanwhile go out together in the next writes)."""
        began = time.perf_counter()
        if self.cursor == 0:
            self.order = list(self.live)
            self.rounds += 1
        # A slice: taps in groups of SLICE until the slice has taken ``slice_s`` (at least one group).
        end = len(self.order)
        while self.cursor < end:
            for tap in self.order[self.cursor:self.cursor + SLICE]:
                if tap._state is TapState.LIVE:
                    self._feed(tap)
            self.cursor = min(self.cursor + SLICE, end)
            if time.perf_counter() - began >= self.slice_s:
                break
        pause = PACE * (time.perf_counter() - began)
        if self.cursor < len(self.order):
            self._schedule(loop, pause)
            return
        self.cursor = 0
        self.order = []
        newest = self.recent[-1].seq if self.recent else 0
        if any(tap.last < newest for tap in self.live):
            self._schedule(loop, pause)  # events came during the round: the taps served early lack them
        else:
            self._chunks.clear()
            self._trim()

    def _schedule(self, loop: asyncio.AbstractEventLoop, pause: float) -> None:
        if not self.scheduled:
            self.scheduled = True
            loop.call_later(pause, self._continue, loop)

    def _continue(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self._round(loop)

    def _feed(self, tap: Tap) -> None:
        """Write ``tap`` what it lacks of ``recent``, unless its sink is over its cap (then it
        falls behind) or gone (then it is closed)."""
        recent = self.recent
        if not recent or tap.last >= recent[-1].seq:
            return
        start = 0 if tap.last < recent[0].seq else bisect.bisect_right(recent, tap.last, key=_seq)
        if tap.sink.backlog() > tap.cap:
            tap.state = TapState.BEHIND
            self._keep(tap)  # every event after its ``last`` is kept until it drains, or until MAX_RECENT
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
        """Let go of the kept events no tap needs any more (none while a round is under way): a
        joining tap needs those published since it began its read, a live one or one behind on
        kept events those after its ``last``."""
        if self.cursor or self.scheduled or not self.recent:
            return
        needed, lowest = len(self.recent), self.recent[-1].seq  # the first event still needed: index, seq
        for tap in self.joining:
            needed = min(needed, max(0, tap.mark - self.dropped))
        for tap in self.live:
            lowest = min(lowest, tap.last)
        kept_from = self._lowest_kept()
        if kept_from is not None:
            lowest = min(lowest, kept_from)
        if lowest < self.recent[-1].seq:
            needed = min(needed, bisect.bisect_right(self.recent, lowest, key=_seq))
        young = bisect.bisect_left(self._published_at, time.monotonic() - self.tail_s)
        self._drop(min(needed, young))
        if self.recent and self._expiry is None:  # let the tail go once it is old, also if nothing else comes
            self._expiry = asyncio.get_running_loop().call_later(self.tail_s, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._trim()

    def close(self) -> None:
        """The audience's last tap left: nothing is kept any more."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _drop(self, count: int) -> None:
        """Let go of the ``count`` oldest kept events; a live tap that still lacked one of them
        falls behind (it reads the store), and a joining tap that needed them joins again."""
        if count <= 0:
            return
        cut = self.recent[count - 1].seq
        for tap in [tap for tap in self.live if tap.last < cut]:
            if tap.take(self.recent[:count]):
                tap.state = TapState.BEHIND
                tap.catch_ups += 1
                tap.wake()
        kept_from = self._lowest_kept()
        if kept_from is not None and kept_from < cut:
            for tap in [tap for tap in self.keeping if tap.last < cut]:
                self._unkeep(tap)
        del self.recent[:count]
        del self._published_at[:count]
        self.dropped += count
        if self.kept_after is not None:
            self.kept_after = max(self.kept_after, cut)
        self._chunks.clear()

    def _keep(self, tap: Tap) -> None:
        self.keeping[tap] = None
        if self._keeping_low is not None:
            self._keeping_low = min(self._keeping_low, tap.last)

    def _unkeep(self, tap: Tap) -> None:
        if self.keeping.pop(tap, False) is None and tap.last == self._keeping_low:
            self._keeping_low = None

    def _lowest_kept(self) -> int | None:
        if self._keeping_low is None and self.keeping:
            self._keeping_low = min(tap.last for tap in self.keeping)
        return self._keeping_low if self.keeping else None


def _seq(event: Event) -> int:
    return event.seq
