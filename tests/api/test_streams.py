"""Event streams over real HTTP at scale: written straight to the connection, flow-controlled per
observer, and one request for a message and its run's events."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from starlette.routing import Match, Route
from starlette.types import Scope

from corral.api.run_stream_shortcut import plain_run_stream
from corral.kernel import Kernel
from corral.kernel.audience import TapState
from corral.settings import Settings
from tests.helpers import (
    TERMINAL_EVENTS,
    Frame,
    assert_contiguous,
    assert_error,
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
    uvicorn_server,
)


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Wait for state the server changes on its own (a disconnect it notices), polling briefly."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.01)


def taps(kernel: Kernel, session_id: str) -> list[Any]:
    audience = kernel.hub._audiences.get(session_id)
    return list(audience.taps) if audience is not None else []


async def catch_ups_metric(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("corral_observer_catch_ups ")))


# --- the direct path ---------------------------------------------------------------------------


async def test_under_uvicorn_a_stream_is_a_tap_written_straight_to_its_connection(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        async with http.stream("GET", f"/v1/sessions/{sid}/events") as response:
            frames = sse_frames(response)
            accepted = await post(http, sid, "hello")
            got = [await anext(frames) for _ in range(5)]
            assert [f.event for f in got] == ["run.queued", "run.started", "message.delta", "message.completed",
                                              "run.completed"]
            (tap,) = taps(kernel, sid)
            assert tap.state is TapState.LIVE and tap.writes >= 1
            assert kernel.hub.statistics()["subscriptions"] == 0
            assert got[-1].json["run_id"] == accepted["run_id"]
        await until(lambda: not taps(kernel, sid), "the stream's end")
        assert kernel.hub.statistics()["sessions"] == 0  # its audience, and what it kept, are gone


# --- flow control ------------------------------------------------------------------------------


async def test_a_stalled_observer_falls_behind_within_a_bounded_number_of_bytes(tmp_path: Any) -> None:
    """A reader that never reads costs its cap and what the kernel keeps unsent, not the megabytes
    its socket buffers could take: then it falls behind, is written nothing more, and reads the log."""
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    filler = " ".join(["x" * 9000] * 10)  # ~0.3 MB of frames a run
    async with asyncio.timeout(60), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", httpx.URL(base).port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            writer.write(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: corral\r\n\r\n".encode())
            await writer.drain()
            await until(lambda: len(taps(kernel, sid)) == 1, "the stalled observer's attach")
            (stalled,) = taps(kernel, sid)
            async with http.stream("GET", f"/v1/sessions/{sid}/events") as watching:
                frames = sse_frames(watching)
                runs = 0
                while stalled.state is not TapState.BEHIND:
                    assert runs < 20, f"never fell behind: {stalled!r}"
                    await post(http, sid, filler)
                    runs += 1
                    async for frame in frames:  # the run's end reached every tap in the same turn
                        if frame.event in TERMINAL_EVENTS:
                            break
                written = stalled.bytes
                assert written < 512 * 1024, written  # cap 32 KB + unsent 16 KB + a receive window + a batch
                assert await catch_ups_metric(http) >= 1
                for _ in range(3):  # behind, it is written nothing however much is committed
                    await post(http, sid, filler)
                    async for frame in frames:
                        if frame.event in TERMINAL_EVENTS:
                            last = frame.seq
                            break
                assert stalled.bytes == written and stalled.state is TapState.BEHIND
            # Once it reads, it gets everything, from the log: nothing was dropped.
            fresh = await read_session_until(http, sid, last)
            drained: list[Frame] = []
            async for frame in parse_sse(raw_sse_lines(reader)):
                drained.append(frame)
                if frame.seq >= last:
                    break
            assert drained == fresh
            assert_contiguous(drained, 1)
        finally:
            writer.close()
            await writer.wait_closed()
        await until(lambda: not taps(kernel, sid), "the stalled observer's end")


# --- a run's stream ------------------------------------------------------------------------------


async def test_a_young_run_stream_takes_the_runs_head_from_memory_not_the_store(settings: Settings) -> None:
    """``POST`` then ``GET /v1/runs/{id}/events``, as docs/api.md shows: the run's events so far
    are kept from its creation (``RunHeads``), so its stream reads nothing from the store."""
    async with asyncio.timeout(60), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        await post(http, sid, "an earlier turn")
        accepted = await post(http, sid, "/steps 2 50")
        reads = kernel.hub.tap_reads
        frames = await read_run(http, accepted["run_id"])
        assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"
        assert {f.json["run_id"] for f in frames} == {accepted["run_id"]}
        assert kernel.hub.tap_reads == reads
        assert kernel.hub.heads.after(accepted["run_id"], 0) is None  # let go at the run's end
        assert frames == [f for f in await read_session_until(http, sid, frames[-1].seq)
                          if f.json.get("run_id") == accepted["run_id"]]  # whole, in order


async def test_a_run_stream_past_the_kept_head_reads_the_store_once_from_the_runs_own_events(
        settings: Settings) -> None:
    async with asyncio.timeout(60), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        for index in range(30):  # a history for the run to skip
            await post(http, sid, f"turn {index}")
        kernel.hub.heads.max_events = 0  # the run outgrows its head with its first event
        accepted = await post(http, sid, "/steps 2 50")
        assert kernel.hub.heads.after(accepted["run_id"], 0) is None
        reads = kernel.hub.tap_reads
        frames = await read_run(http, accepted["run_id"])
        assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"
        assert {f.json["run_id"] for f in frames} == {accepted["run_id"]}
        assert kernel.hub.tap_reads - reads == 1  # one page, of this run's events only


def test_only_a_plain_run_stream_request_may_take_the_shortcut() -> None:
    """A plain ``GET`` (what a client following each turn sends) may be served by the shortcut;
    anything with a query, a ``Last-Event-ID``, another method or another path goes to the route."""

    def plain(method: str = "GET", path: str = "/v1/runs/run_1/events", query: bytes = b"",
              headers: tuple[tuple[bytes, bytes], ...] = ()) -> str | None:
        return plain_run_stream({"type": "http", "method": method, "path": path, "query_string": query,
                                 "headers": [(b"host", b"x"), *headers]})

    assert plain() == "run_1"
    assert plain(query=b"after=3") is None
    assert plain(query=b"on_disconnect=cancel") is None
    assert plain(headers=((b"last-event-id", b"3"),)) is None
    assert plain("HEAD") is None and plain("POST") is None
    assert plain(path="/v1/runs/run_1/events/more") is None and plain(path="/v1/runs/run_1") is None


class Witness(Route):
    """A route that matches nothing and notes every request the router is asked to route."""

    def __init__(self, seen: list[str]):
        super().__init__("/", lambda _request: None)
        self.seen = seen

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        self.seen.append(scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else ""))
        return Match.NONE, {}


async def test_a_live_runs_plain_stream_skips_the_router_and_answers_as_the_route_does(settings: Settings) -> None:
    async with asyncio.timeout(60), uvicorn_server(settings) as (base, _, server), client(base) as http:
        routed: list[str] = []
        server.config.app.router.routes.insert(0, Witness(routed))
        sid = await new_http_session(http)
        run_id = (await post(http, sid, "/sleep 30"))["run_id"]  # live until it is cancelled
        path = f"/v1/runs/{run_id}/events"
        async with http.stream("GET", path) as shortcut, http.stream("GET", path, params={"after": 0}) as checked:
            assert shortcut.status_code == checked.status_code == 200
            assert [seen for seen in routed if seen.startswith(path)] == [f"{path}?after=0"]  # not the plain one
            assert (await http.post(f"/v1/runs/{run_id}/cancel", json={"mode": "hard"})).status_code == 202
            by_shortcut = [frame async for frame in sse_frames(shortcut)]
            by_route = [frame async for frame in sse_frames(checked)]
        assert by_shortcut == by_route and by_shortcut[-1].event == "run.cancelled"
        # Once the run has ended, the plain request is the route's (a replay), with the same frames.
        assert await read_run(http, run_id) == by_shortcut
        assert routed[-1] == path
        # The route still validates what the shortcut never sees, and explains what it does not serve.
        assert_error(await http.get(path, params={"after": -1}), 422, "invalid_input")
        assert_error(await http.get(path, params={"on_disconnect": "x"}), 422, "invalid_input")
        assert_error(await http.get(path, headers={"last-event-id": "x"}), 400, "invalid_input")
        assert_error(await http.get("/v1/runs/run_missing/events"), 404, "not_found")
        refused = await http.post(path)
        assert_error(refused, 405, "method_not_allowed")
        assert refused.headers.get_list("allow") == ["GET"]


def read_run_stream_until_its_end_event(sock: socket.socket, run_id: str) -> bytes:
    """GET a run's stream on ``sock`` (blocking, in a thread of its own) and read until the bytes
    hold the run's terminal event: what a client that stops there has read."""
    sock.sendall(f"GET /v1/runs/{run_id}/events HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    received = b""
    while b"event: run.completed" not in received:
        read = sock.recv(65536)
        assert read, "the connection closed before the run's end"
        received += read
    return received


async def test_a_runs_stream_ends_in_the_same_write_as_its_terminal_event(settings: Settings) -> None:
    """A client that stops reading at the run's terminal event has read the whole response, so
    its connection is reused: the last events and the chunked end are written together (a
    client in another thread reads as soon as anything arrives)."""
    async with asyncio.timeout(30), http_server(settings) as (base, _), client(base) as http:
        sid = await new_http_session(http)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            for turn in range(10):
                run_id = (await post(http, sid, f"/steps 2 5 turn {turn}"))["run_id"]
                received = await asyncio.to_thread(read_run_stream_until_its_end_event, sock, run_id)
                assert received.endswith(b"\r\n0\r\n\r\n"), received[-200:]  # nothing more to come


# --- one request -------------------------------------------------------------------------------


async def test_a_post_with_accept_event_stream_answers_with_its_runs_events(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        sid = await new_http_session(http)
        reads = kernel.hub.tap_reads
        async with http.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": '/tool echo {"text": "a"}'},
                               headers={"accept": "text/event-stream"}) as response:
            assert response.status_code == 200
            run_id = response.headers["x-corral-run-id"]
            assert response.headers["x-corral-disposition"] == "started"
            assert response.headers["x-corral-input-id"].startswith("in_")
            frames = [frame async for frame in sse_frames(response)]
        for frame in frames:
            check_frame(frame)
        assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"
        assert kernel.hub.tap_reads == reads  # a new run: every event came through the hub
        assert await read_run(http, run_id) == frames  # the frames a GET of the run's stream has
        # ?stream=true does the same for a client that cannot set Accept; a queued run too.
        async with http.stream("POST", f"/v1/sessions/{sid}/messages", params={"stream": "true"},
                               json={"content": "two"}) as response:
            assert response.status_code == 200
            second = [frame async for frame in sse_frames(response)]
        assert second[-1].json["output"] == "echo: two"
        assert {f.json["run_id"] for f in second} == {response.headers["x-corral-run-id"]}


async def test_a_streamed_post_resumes_by_idempotency_key_and_last_event_id(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, _kernel), client(base) as http:
        await create_agent(http, "ticker", provider_options={"token_ms": 5})
        sid = await new_http_session(http, "ticker")
        body = {"content": " ".join(f"w{i}" for i in range(30))}
        headers = {"accept": "text/event-stream", "idempotency-key": "k1"}
        seen: list[Frame] = []
        async with http.stream("POST", f"/v1/sessions/{sid}/messages", json=body, headers=headers) as response:
            run_id = response.headers["x-corral-run-id"]
            async for frame in sse_frames(response):
                seen.append(frame)
                if len(seen) == 4:
                    break  # cut off mid-run
        resumed_headers = {**headers, "last-event-id": str(seen[-1].seq)}
        async with http.stream("POST", f"/v1/sessions/{sid}/messages", json=body, headers=resumed_headers) as again:
            assert again.headers["x-corral-run-id"] == run_id  # the same input: nothing new is accepted
            rest = [frame async for frame in sse_frames(again)]
        whole = await read_run(http, run_id)
        assert seen + rest == whole
        assert_contiguous(whole, 1)
        assert len((await http.get("/v1/runs", params={"session_id": sid})).json()["runs"]) == 1


async def test_a_streamed_post_that_is_refused_answers_json(settings: Settings) -> None:
    async with asyncio.timeout(30), http_server(settings) as (base, kernel), client(base) as http:
        stream = {"accept": "text/event-stream"}
        missing = await http.post("/v1/sessions/ses_nope/messages", json={"content": "x"}, headers=stream)
        assert_error(missing, 404, "not_found")
        sid = await new_http_session(http)
        busy = await post(http, sid, "/steps 3 100")
        refused = await http.post(f"/v1/sessions/{sid}/messages", json={"content": "x", "mode": "reject"},
                                  headers=stream)
        assert_error(refused, 409)
        assert not taps(kernel, sid)  # the stream opened for it is closed again
        frames = await read_run(http, busy["run_id"])
        assert frames[-1].event == "run.completed"
