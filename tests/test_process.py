"""The real ``corral serve`` process: crash recovery after ``kill -9`` and a bounded SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import (
    CORRAL,
    Frame,
    clean_env,
    client,
    corral_serve,
    free_port,
    new_http_session,
    post,
    sse_frames,
    until_event,
)


@dataclass
class SessionLog:
    """What a session's event stream says about runs: how each ended and where inputs moved."""

    ended: dict[str, str] = field(default_factory=dict)  # run id -> terminal event type
    moved: dict[tuple[str, str], str] = field(default_factory=dict)  # (from run, input) -> new run
    started: list[str] = field(default_factory=list)  # run ids in start order
    frames: list[Frame] = field(default_factory=list)

    def add(self, frame: Frame) -> None:
        self.frames.append(frame)
        body = frame.json
        if frame.event.startswith("run.") and frame.event not in {"run.queued", "run.started", "run.waiting",
                                                                   "run.steered"}:
            self.ended[body["run_id"]] = frame.event
        elif frame.event == "run.started":
            self.started.append(body["run_id"])
        elif frame.event == "input.requeued":
            for input_id in body["input_ids"]:
                self.moved[(body["from_run_id"], input_id)] = body["run_id"]

    def final_run(self, input_id: str, run_id: str) -> tuple[list[str], str | None]:
        """The chain of runs an input went through, and how the last one ended (None: not yet)."""
        chain = [run_id]
        while self.ended.get(chain[-1]) == "run.interrupted":
            successor = self.moved.get((chain[-1], input_id))
            if successor is None:
                return chain, None  # its input.requeued is not here yet
            chain.append(successor)
        return chain, self.ended.get(chain[-1])


async def follow_until_settled(
    http: httpx.AsyncClient, session_id: str, inputs: list[dict[str, Any]]
) -> tuple[SessionLog, dict[str, list[str]]]:
    """Read the session's log from seq 1 until every accepted input has ended in a completed run."""
    log = SessionLog()
    async with http.stream("GET", f"/v1/sessions/{session_id}/events") as response:
        async for frame in sse_frames(response):
            log.add(frame)
            chains = {i["input_id"]: log.final_run(i["input_id"], i["run_id"]) for i in inputs}
            ends = {end for _, end in chains.values()}
            assert ends <= {None, "run.completed"}, (chains, log.ended)
            if ends == {"run.completed"}:
                return log, {input_id: chain for input_id, (chain, _) in chains.items()}
    raise AssertionError("the session stream ended")


async def test_crash_recovery_after_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    accepted: dict[str, list[dict[str, Any]]] = {}  # session -> every 202 body (with its content)
    async with asyncio.timeout(120):
        async with corral_serve(data) as server, client(server.base) as http:
            sessions = [await new_http_session(http) for _ in range(3)]
            for index, sid in enumerate(sessions):
                accepted[sid] = []
                for content in (f"/steps 3 500 s{index}-1", f"plain s{index}-2", f"/steps 3 500 s{index}-3",
                                f"plain s{index}-4"):
                    body = await post(http, sid, content)
                    accepted[sid].append({**body, "content": content})
                assert [a["disposition"] for a in accepted[sid]] == ["started", "queued", "queued", "queued"]
            # Every session's first run is inside its first tool call; the rest wait behind it.
            for sid in sessions:
                run_id = accepted[sid][0]["run_id"]
                async with http.stream("GET", f"/v1/runs/{run_id}/events") as response:
                    await until_event(sse_frames(response), "tool.started")
            server.proc.kill()
            assert await server.proc.wait() == -signal.SIGKILL

        async with corral_serve(data) as server, client(server.base) as http:
            for sid in sessions:
                log, chains = await follow_until_settled(http, sid, accepted[sid])
                first, *rest = accepted[sid]
                # The run cut off mid-flight is `interrupted`, with one requeued successor that completed.
                assert len(chains[first["input_id"]]) == 2, chains
                cut, successor = chains[first["input_id"]]
                run = (await http.get(f"/v1/runs/{cut}")).json()
                assert run["status"] == "interrupted" and run["error"]["code"] == "interrupted"
                assert run["ended_at"] is not None
                done = (await http.get(f"/v1/runs/{successor}")).json()
                assert done["status"] == "completed"
                assert done["output"] == "done 3 steps; steering seen: []"
                # The queued inputs kept their runs and ran in order, after the successor (the log is read
                # from seq 1, so the cut run's own start, before the crash, comes first).
                for item in rest:
                    assert chains[item["input_id"]] == [item["run_id"]]
                assert log.started == [cut, successor] + [item["run_id"] for item in rest]
                # The log itself stayed gap-free across the crash.
                assert [f.seq for f in log.frames] == list(range(1, len(log.frames) + 1))
                # The context holds every accepted input exactly once, in order; the cut run's are rolled back.
                messages = (await http.get(f"/v1/sessions/{sid}/messages")).json()
                live = [m["content"] for m in messages if m["role"] == "user" and not m["rolled_back"]]
                assert live == [item["content"] for item in accepted[sid]]
                assert all(m["rolled_back"] for m in messages if m["run_id"] == cut)

            for status in ("running", "waiting", "queued"):
                assert (await http.get("/v1/runs", params={"status": status})).json()["runs"] == [], status
            interrupted = (await http.get("/v1/runs", params={"status": "interrupted"})).json()["runs"]
            assert sorted(r["id"] for r in interrupted) == sorted(accepted[sid][0]["run_id"] for sid in sessions)


async def _start_half_sent_post(base: str, session_id: str, body: bytes) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:
    """A POST whose headers are in and whose handler is waiting for the body (``100 Continue`` says so)."""
    url = httpx.URL(base)
    assert url.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", url.port)
    writer.write(
        f"POST /v1/sessions/{session_id}/messages HTTP/1.1\r\nHost: corral\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split()[1])
    lengths = [line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("content-length:")]
    length = int(lengths[0])
    return status, await reader.readexactly(length)


async def test_sigterm_stops_within_bounds_records_interrupted_and_requeues(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with asyncio.timeout(90):
        async with corral_serve(data, CORRAL_SHUTDOWN_GRACE_S="1") as server, client(server.base) as http:
            sid = await new_http_session(http)
            long = await post(http, sid, '/tool wait {"ms": 2500}')
            queued = await post(http, sid, "after the restart")
            last_seen = 0
            async with http.stream("GET", f"/v1/sessions/{sid}/events") as response:
                frames = sse_frames(response)
                last_seen = (await until_event(frames, "tool.started", run_id=long["run_id"])).seq
                reader, writer = await _start_half_sent_post(server.base, sid, b'{"content": "too late"}')
                began = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                # Intake stops and every observer stream ends (cleanly) at once.
                async for frame in frames:
                    last_seen = frame.seq
            try:
                writer.write(b'{"content": "too late"}')
                await writer.drain()
                status, body = await _read_response(reader)
            finally:
                writer.close()
            assert status == 503, body
            assert b'"shutting_down"' in body
            code = await server.proc.wait()
            elapsed = time.monotonic() - began
            assert code in (0, -signal.SIGTERM), server.log
            # The wait has 2.5 s to go: the soft grace (1 s) passes, then the hard cancel; nothing more.
            assert 0.9 < elapsed < 5.0, (elapsed, server.log)

        async with corral_serve(data) as server, client(server.base) as http:
            run = (await http.get(f"/v1/runs/{long['run_id']}")).json()
            assert run["status"] == "interrupted", run
            assert run["ended_at"] is not None
            assert (await http.get(f"/v1/runs/{queued['run_id']}")).json()["status"] in {"queued", "running",
                                                                                        "completed"}
            # Resuming where the stream ended: no gap, the interruption, the requeue, then both inputs complete.
            log = SessionLog()
            headers = {"Last-Event-ID": str(last_seen)}
            async with http.stream("GET", f"/v1/sessions/{sid}/events", headers=headers) as response:
                async for frame in sse_frames(response):
                    log.add(frame)
                    if log.ended.get(queued["run_id"]):
                        break
            assert [f.seq for f in log.frames] == list(range(last_seen + 1, last_seen + 1 + len(log.frames)))
            assert log.ended[long["run_id"]] == "run.interrupted"
            successor = log.moved[(long["run_id"], long["input_id"])]
            assert log.ended[successor] == "run.completed"
            assert log.started == [successor, queued["run_id"]]
            assert log.ended[queued["run_id"]] == "run.completed"
            runs = (await http.get("/v1/runs", params={"session_id": sid})).json()["runs"]
            outputs = {r["id"]: r["output"] for r in runs}
            assert outputs[successor] == "tool results: waited 2500 ms"
            assert outputs[queued["run_id"]] == "echo: after the restart"
            contents = [m["content"] for m in (await http.get(f"/v1/sessions/{sid}/messages")).json()]
            assert "too late" not in contents


async def test_an_observer_that_stopped_reading_does_not_hold_up_the_shutdown(tmp_path: Path) -> None:
    """Its stream ends at SIGTERM, but its connection cannot flush: it must not hold uvicorn's drain."""
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path / "data") as server, client(server.base) as http:
            sid = await new_http_session(http)
            url = httpx.URL(server.base)
            assert url.port is not None
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", url.port))
            _reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
            try:
                writer.write(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: corral\r\n\r\n".encode())
                await writer.drain()
                filler = " ".join(["x" * 9000] * 20)
                # ~0.5 MB of frames per run, 6.5 MB in all: more than every buffer on the way can hold.
                runs = [await post(http, sid, filler) for _ in range(12)]
                async with http.stream("GET", f"/v1/runs/{runs[-1]['run_id']}/events") as response:
                    await until_event(sse_frames(response), "run.completed")
                began = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                assert await server.proc.wait() in (0, -signal.SIGTERM), server.log
                elapsed = time.monotonic() - began
            finally:
                writer.close()
            # Nothing to wait for (no run is active): only the stalled connection could hold it up,
            # for uvicorn's whole timeout_graceful_shutdown (2 s) if it were not dropped.
            assert elapsed < 1.5, (elapsed, server.log)


async def test_serve_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    async with asyncio.timeout(30):
        proc = await asyncio.create_subprocess_exec(
            str(CORRAL), "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path),
            env=clean_env(CORRAL_LOG_LEVEL="warning"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 2
        assert b"refusing to bind 0.0.0.0" in stderr


async def test_secrets_never_reach_the_logs(tmp_path: Path) -> None:
    """Debug logging, access logs, accepted and refused tokens, a failing run: no token appears."""
    admin, alice, wrong = "admin-secret-token-000111", "alice-secret-token-222333", "wrong-secret-token-444555"
    principals = f'[{{"name": "alice", "token": "{alice}"}}]'
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path, CORRAL_API_TOKEN=admin, CORRAL_PRINCIPALS=principals,
                                CORRAL_LOG_LEVEL="debug") as server:
            async with client(server.base, headers={"Authorization": f"Bearer {alice}"}) as http:
                sid = await new_http_session(http)
                accepted = await post(http, sid, "/fail")
                async with http.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
                    assert [f async for f in sse_frames(response)][-1].event == "run.failed"
                assert (await http.get("/v1/agents", headers={"Authorization": f"Bearer {wrong}"})).status_code == 401
            async with client(server.base, headers={"Authorization": f"Bearer {admin}"}) as http:
                assert (await http.get("/v1/sessions")).status_code == 200
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.proc.wait(), 20)  # everything it logged is in
        log = "".join(server.output)
        assert "GET /v1/sessions" in log  # the access log was on: the check below means something
        for secret in (admin, alice, wrong):
            assert secret not in log

