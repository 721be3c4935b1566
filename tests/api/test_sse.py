"""Server-Sent Events over real HTTP: replay, resume, fan-out, slow observers, disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import datetime
from typing import Any

import httpx

from corral.kernel import Kernel
from corral.kernel.audience import TapState
from corral.settings import Settings
from tests.helpers import (
    TERMINAL_EVENTS,
    Frame,
    assert_contiguous,
    check_frame,
    client,
    create_agent,
    http_server,
    new_http_session,
    parse_sse,
    post,
    raw_sse_lines,
    read_run,
    read_session_until,
    sse_frames,
    wait_run,
)

# --- replay -----------------------------------------------------------------------------


async def test_late_observer_gets_every_event_from_seq_1(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        first = await post(http, sid, '/tool echo {"text": "one"}')
        second = await post(http, sid, "two")
        await wait_run(kernel, second["run_id"])  # both done, and nobody watched over HTTP

        run1 = await read_run(http, first["run_id"])
        for frame in run1:
            check_frame(frame)
            assert frame.json["run_id"] == first["run_id"]
        assert run1[0].seq == 1
        assert [f.event for f in run1] == [
            "run.queued", "run.started", "message.completed", "tool.started", "tool.completed",
            "message.delta", "message.completed", "run.completed",
        ]
        assert run1[-1].json["output"] == "tool results: one"

        run2 = await read_run(http, second["run_id"])
        assert run2[-1].event == "run.completed" and run2[-1].json["output"] == "echo: two"
        # Run 2 was queued while run 1 ran, so the two runs' events interleave in the session log.
        whole = await read_session_until(http, sid, run2[-1].seq)
        assert_contiguous(whole, 1)
        assert sorted(run1 + run2, key=lambda f: f.seq) == whole
        for frame in whole:
            check_frame(frame)
            assert frame.json["session_id"] == sid


async def test_run_stream_of_an_ended_run_ends_after_replay_even_when_resumed_past_the_end(
    settings: Settings,
) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        accepted = await post(http, sid, "done")
        await wait_run(kernel, accepted["run_id"])
        frames = await read_run(http, accepted["run_id"])
        assert frames[-1].event == "run.completed"
        # Nothing after the terminal event: the stream still ends instead of hanging.
        assert await read_run(http, accepted["run_id"], params={"after": frames[-1].seq}) == []


# --- resume ------------------------------------------------------------------------------


async def test_resume_with_after_and_last_event_id_has_no_gap_and_no_duplicate(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        accepted = await post(http, sid, '/tool echo {"text": "a"}\n/tool echo {"text": "b"}')
        await wait_run(kernel, accepted["run_id"])
        full = await read_run(http, accepted["run_id"])
        assert len(full) >= 8
        assert_contiguous(full, 1)
        for cut in (0, 1, len(full) // 2, len(full) - 1):
            n = full[cut].seq
            by_query = await read_run(http, accepted["run_id"], params={"after": n})
            by_header = await read_run(http, accepted["run_id"], headers={"Last-Event-ID": str(n)})
            assert by_query == full[cut + 1 :]
            assert by_header == full[cut + 1 :]
            if n < full[-1].seq:  # (a session stream never ends by itself: read it only up to the end)
                by_session = await read_session_until(http, sid, full[-1].seq, headers={"Last-Event-ID": str(n)})
                assert by_session == full[cut + 1 :]


async def test_resume_from_the_middle_of_a_live_run(tmp_path: Any) -> None:
    """Reattach while the run is still producing: the backlog/live seam has no gap or duplicate."""
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        await create_agent(http, "ticker", provider_options={"token_ms": 1})
        sid = await new_http_session(http, "ticker")
        accepted = await post(http, sid, " ".join(f"w{i}" for i in range(400)))
        seen: list[Frame] = []
        resumed: asyncio.Task[list[Frame]] | None = None
        async with http.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
            async for frame in sse_frames(response):
                seen.append(frame)
                if len(seen) == 50:  # mid-run: the reply is still streaming
                    headers = {"Last-Event-ID": frame.id or ""}
                    resumed = asyncio.create_task(read_run(http, accepted["run_id"], headers=headers))
        assert resumed is not None
        tail = await resumed
        assert seen[-1].event == "run.completed"
        assert tail == seen[50:]
        assert_contiguous(seen, 1)


async def test_bad_last_event_id_is_400(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        accepted = await post(http, sid, "x")
        for path in (f"/v1/sessions/{sid}/events", f"/v1/runs/{accepted['run_id']}/events"):
            for bad in ("abc", "-1", "1.5"):
                response = await http.get(path, headers={"Last-Event-ID": bad})
                assert response.status_code == 400, (path, bad, response.text)
                assert response.json()["error"]["code"] == "invalid_input"
            response = await http.get(path, params={"after": -1})
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "invalid_input"
        for path in ("/v1/sessions/ses_nope/events", "/v1/runs/run_nope/events"):
            response = await http.get(path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        await wait_run(kernel, accepted["run_id"])


# --- fan-out -----------------------------------------------------------------------------


async def test_two_observers_on_a_session_receive_identical_sequences(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        got: list[list[Frame]] = [[], []]
        both_attached = asyncio.Event()
        attached = 0
        last_run: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def observe(index: int) -> None:
            nonlocal attached
            async with http.stream("GET", f"/v1/sessions/{sid}/events") as response:
                attached += 1
                if attached == 2:
                    both_attached.set()
                async for frame in sse_frames(response):
                    got[index].append(frame)
                    if frame.event in TERMINAL_EVENTS and last_run.done() and frame.json["run_id"] == last_run.result():
                        return

        observers = [asyncio.create_task(observe(i)) for i in range(2)]
        await both_attached.wait()
        ids = []
        # (/fail last: the demo model would read a failed turn's directive into the next message's turn.)
        for content in ('/tool echo {"text": "1"}', "plain", "/steps 2 10", "last", "/fail"):
            ids.append((await post(http, sid, content))["run_id"])
        last_run.set_result(ids[-1])
        await asyncio.gather(*observers)
        assert got[0] == got[1]
        assert_contiguous(got[0], 1)
        terminal = {f.json["run_id"]: f.event for f in got[0] if f.event in TERMINAL_EVENTS}
        assert terminal == {
            ids[0]: "run.completed", ids[1]: "run.completed", ids[2]: "run.completed",
            ids[3]: "run.completed", ids[4]: "run.failed",
        }
        # And a third observer attaching afterwards gets the very same log.
        assert await read_session_until(http, sid, got[0][-1].seq) == got[0]


# --- slow observers ---------------------------------------------------------------------


async def _timed_run(http: httpx.AsyncClient, session_id: str, content: str) -> float:
    """Post and follow the run with a normal reader; the run's own duration as the server recorded it."""
    accepted = await post(http, session_id, content)
    frames = await read_run(http, accepted["run_id"])
    assert frames[-1].event == "run.completed"
    run = (await http.get(f"/v1/runs/{accepted['run_id']}")).json()
    started, ended = datetime.fromisoformat(run["started_at"]), datetime.fromisoformat(run["ended_at"])
    return (ended - started).total_seconds()


async def test_an_observer_that_never_reads_does_not_slow_the_run(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    words = " ".join(f"word{i}" for i in range(1200))  # 1200 deltas (over the 1000-event buffer), ~1 ms apart
    filler = " ".join(["x" * 9000] * 20)  # few events but ~0.5 MB of frames each
    async with asyncio.timeout(60), http_server(settings) as (base, kernel), client(base) as http:
        await create_agent(http, "streamer", provider_options={"token_ms": 1})
        baseline_sid = await new_http_session(http, "streamer")
        baseline = await _timed_run(http, baseline_sid, words)

        sid = await new_http_session(http, "streamer")
        # The stalled observer: a tiny receive window and a reader that never reads. Its stream is jammed
        # once the fillers' frames exceed every buffer on the way (socket buffers are at most 4 MB here).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", httpx.URL(base).port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            writer.write(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: corral\r\n\r\n".encode())
            await writer.drain()
            lines = raw_sse_lines(reader)
            for _ in range(12):
                await post(http, sid, filler)
            with_stalled = await _timed_run(http, sid, words)
            # The scenario is real: the observer's buffer overflowed while the run went on at full speed.
            assert _lagged_subscriptions(kernel, sid) == 1
            assert with_stalled < baseline * 1.5 + 0.3, (baseline, with_stalled)

            runs = (await http.get("/v1/runs", params={"session_id": sid})).json()["runs"]
            assert [r["status"] for r in runs] == ["completed"] * 13
            last = (await read_run(http, runs[0]["id"]))[-1].seq

            # A normal observer attaching now gets everything...
            fresh = await read_session_until(http, sid, last)
            assert_contiguous(fresh, 1)
            # ...and so does the stalled one once it reads: it fell back to the log, nothing was dropped.
            drained: list[Frame] = []
            async for frame in parse_sse(lines):
                drained.append(frame)
                if frame.seq >= last:
                    break
            assert drained == fresh
        finally:
            writer.close()
            await writer.wait_closed()


def _lagged_subscriptions(kernel: Kernel, session_id: str) -> int:
    """Observers of the session that fell behind: taps over their cap, subscriptions whose buffer filled."""
    audience = kernel.hub._audiences.get(session_id)
    behind = sum(1 for tap in audience.taps if tap.state is TapState.BEHIND) if audience is not None else 0
    return behind + sum(1 for sub in kernel.hub._subs.get(session_id, ()) if sub.lagged)


# --- disconnects -------------------------------------------------------------------------


async def test_on_disconnect_cancel_cancels_the_run_when_the_client_goes_away(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        async with http.stream("GET", f"/v1/sessions/{sid}/events") as watch:
            frames = sse_frames(watch)
            accepted = await post(http, sid, "/steps 100 50")
            run_id = accepted["run_id"]
            async with client(base) as leaving:
                async with leaving.stream(
                    "GET", f"/v1/runs/{run_id}/events", params={"on_disconnect": "cancel"}
                ) as response:
                    async for frame in sse_frames(response):
                        if frame.event == "tool.started":
                            break  # and hang up mid-run
            async for frame in frames:
                if frame.event in TERMINAL_EVENTS:
                    break
            assert frame.event == "run.cancelled"
            assert frame.json["run_id"] == run_id
        run = (await http.get(f"/v1/runs/{run_id}")).json()
        assert run["status"] == "cancelled"
        assert run["error"]["code"] == "cancelled"


async def test_plain_disconnect_leaves_the_run_alone(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        sid = await new_http_session(http)
        async with http.stream("GET", f"/v1/sessions/{sid}/events") as watch:
            frames = sse_frames(watch)
            accepted = await post(http, sid, "/steps 3 50")
            async with client(base) as leaving:
                async with leaving.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
                    async for frame in sse_frames(response):
                        if frame.event == "tool.started":
                            break
            async for frame in frames:
                if frame.event in TERMINAL_EVENTS:
                    break
            assert frame.event == "run.completed"
            assert frame.json["output"].startswith("done 3 steps")


def test_frames_are_the_bytes_sse_starlette_would_write() -> None:
    """Events are framed by hand (routes/events.py) for speed; the wire format must not change,
    whatever the data holds: line breaks, quotes, non-ASCII text."""
    from sse_starlette import ServerSentEvent

    from corral.api.routes.events import _encode
    from corral.store import Event

    events = [
        Event("ses_1", 7, "message.delta", "run_1", {"text": "two\nlines\r\nand \"quotes\" — ünïcode"},
              datetime(2026, 12, 2, 1, 2, 3)),
        Event("ses_1", 8, "run.completed", "run_1", {"output": ""}, datetime(2026, 12, 2, 1, 2, 4)),
    ]
    expected = b"".join(ServerSentEvent(json.dumps(e.payload()), event=e.type, id=str(e.seq)).encode()
                        for e in events)
    assert _encode(events) == expected
    assert _encode(events) == expected  # the second time from each event's cached JSON
    assert [json.loads(e.payload_json()) for e in events] == [e.payload() for e in events]
