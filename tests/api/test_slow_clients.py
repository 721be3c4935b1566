"""Slow and numerous clients against a real ``corral serve`` (api/http_protocol.py, issue 18):
headers and bodies trickled a byte at a time, more connections than the cap, and a request sent
on an idle keep-alive connection while the server was stopped.

The connections are raw sockets, so that a test controls every byte and sees exactly when the
server closes; the limits are a second or two (settings), so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError

from corral.settings import Settings, load_settings
from tests.helpers import Server, client, corral_serve

# One server for the tests that share its limits (a start costs seconds), in one event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.0
# What the closing may take beyond its deadline on a busy machine.
SLACK_S = 5.0
TRICKLE_EVERY_S = 0.2


# --- raw HTTP/1.1 ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/json", self
        error = json.loads(self.body)["error"]
        assert isinstance(error, dict) and {"code", "message", "type"} <= error.keys(), error
        return error


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nhost: corral\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
    return (head + "\r\n").encode() + payload


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return Response(int(status_line.split()[1]), headers, body)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (end of stream or a reset)."""
    received = b""
    with suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """``data`` a byte every ``TRICKLE_EVERY_S``, until it is sent or the server closes."""
    with suppress(ConnectionError):
        for index in range(len(data)):
            writer.write(data[index:index + 1])
            await writer.drain()
            await asyncio.sleep(TRICKLE_EVERY_S)


async def closed_within(reader: asyncio.StreamReader, since: float) -> tuple[float, bytes]:
    received = await until_closed(reader)
    return time.monotonic() - since, received


# --- the process ----------------------------------------------------------------------------


def main_thread(pid: int, what: str) -> str:
    return Path(f"/proc/{pid}/task/{pid}/{what}").read_text()


async def until(pid: int, condition: Callable[[int], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition(pid):
        assert time.monotonic() < deadline, f"process {pid}: {main_thread(pid, 'stat')}"
        await asyncio.sleep(0.01)


def stopped(pid: int) -> bool:
    return main_thread(pid, "stat").rsplit(")", 1)[1].split()[0] == "T"


def waiting_in_select(pid: int) -> bool:
    """The event loop has nothing to do: its thread sleeps in epoll_wait until the next timer."""
    return main_thread(pid, "wchan") == "do_epoll_wait"


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


# --- the tests ------------------------------------------------------------------------------

# The module's server starts with this soft limit on open files, below what the default
# max_connections needs: ``corral serve`` raises it (test_serve_raises_the_open_files_limit...).
LOW_OPEN_FILES = 512


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, LOW_OPEN_FILES), hard))  # inherited by the server
    try:
        async with corral_serve(tmp_path_factory.mktemp("slow-clients"), CORRAL_HEADER_TIMEOUT_S=f"{HEADER_TIMEOUT_S}",
                                CORRAL_BODY_TIMEOUT_S=f"{BODY_TIMEOUT_S}",
                                CORRAL_KEEP_ALIVE_TIMEOUT_S=f"{KEEP_ALIVE_S}") as started:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            yield started
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@module_loop
async def test_connections_trickling_headers_are_closed_at_the_header_timeout_and_others_are_served(
    server: Server,
) -> None:
    slow = b"GET /healthz HTTP/1.1\r\nhost: corral\r\n" + b"x-slow: 1\r\n" * 100
    async with asyncio.timeout(30):
        since = time.monotonic()
        trickling = [await connect(server) for _ in range(40)]
        silent = [await connect(server) for _ in range(10)]  # not even a first byte
        async with asyncio.TaskGroup() as group:
            for _, writer in trickling:
                group.create_task(trickle(writer, slow))
            closings = [group.create_task(closed_within(reader, since)) for reader, _ in trickling + silent]
            async with client(server.base) as http:
                assert (await http.get("/healthz")).status_code == 200
                created = await http.post("/v1/sessions", json={"agent": "assistant"})
                assert created.status_code == 201, created.text
            served_after = time.monotonic() - since
            assert served_after < HEADER_TIMEOUT_S and not any(closing.done() for closing in closings)
        for closing in closings:
            elapsed, received = closing.result()
            assert received == b""  # closed without a response
            assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
        for _, writer in trickling + silent:
            writer.close()
        assert server.proc.returncode is None


@module_loop
async def test_a_connection_used_for_longer_than_the_header_timeout_is_served_throughout(server: Server) -> None:
    """The header deadline is per request: a keep-alive connection may live longer than it."""
    async with asyncio.timeout(30):
        reader, writer = await connect(server)
        since = time.monotonic()
        while time.monotonic() - since < 1.5 * HEADER_TIMEOUT_S:
            writer.write(request("GET", "/healthz"))
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(KEEP_ALIVE_S / 4)  # idle between requests, as keep-alive allows
        writer.close()


@module_loop
async def test_a_second_request_trickled_on_a_kept_alive_connection_is_closed_at_the_header_timeout(
    server: Server,
) -> None:
    """The deadline starts again with the next request's first byte: keep-alive's idle timer
    stops when bytes come, and the header deadline takes over until the head is whole."""
    slow = b"GET /healthz HTTP/1.1\r\nhost: corral\r\n" + b"x-slow: 1\r\n" * 100
    async with asyncio.timeout(30):
        reader, writer = await connect(server)
        writer.write(request("GET", "/healthz"))
        assert (await read_response(reader)).status == 200
        since = time.monotonic()
        async with asyncio.TaskGroup() as group:
            group.create_task(trickle(writer, slow))
            elapsed, received = await closed_within(reader, since)
        assert received == b""  # closed without a response
        # Neither keep-alive's timer (1 s) nor never: the header deadline, from the first byte.
        assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
        writer.close()


@module_loop
async def test_a_trickled_body_gets_408_at_the_body_timeout_and_nothing_is_stored(server: Server) -> None:
    trickled = {"agent": "assistant", "metadata": {"trickled": "x" * 40}}
    whole = request("POST", "/v1/sessions", trickled)
    head_end = whole.index(b"\r\n\r\n") + 4
    async with asyncio.timeout(30):
        reader, writer = await connect(server)
        since = time.monotonic()
        writer.write(whole[:head_end + 1])  # the headers, then the body a byte at a time
        async with asyncio.TaskGroup() as group:
            trickling = group.create_task(trickle(writer, whole[head_end + 1:]))
            answered = await read_response(reader)
            elapsed = time.monotonic() - since
            assert await until_closed(reader) == b""
            trickling.cancel()
            writer.close()
        assert answered.status == 408, answered
        assert answered.headers["connection"] == "close"
        error = answered.error()
        assert error["code"] == "request_timeout" and "body_timeout_s" in error["message"], error
        assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + SLACK_S, elapsed
        async with client(server.base) as http:
            # The same body, sent at once, is served; the trickled one was not stored.
            assert (await http.post("/v1/sessions", json=trickled)).status_code == 201
            stored = [s["metadata"] for s in (await http.get("/v1/sessions")).json()]
            assert stored.count(trickled["metadata"]) == 1, stored
        assert "Traceback" not in server.log, server.log  # the app saw the client leave, no error


@module_loop
async def test_beyond_max_connections_a_connection_gets_503_and_one_is_served_once_others_close(
    tmp_path: Path,
) -> None:
    cap = 4
    async with asyncio.timeout(60), corral_serve(tmp_path, CORRAL_MAX_CONNECTIONS=str(cap),
                                                 CORRAL_KEEP_ALIVE_TIMEOUT_S="30",
                                                 CORRAL_HEADER_TIMEOUT_S="30") as server:
        held = [await served_connection(server) for _ in range(cap)]
        reader, writer = await connect(server)
        writer.write(request("POST", "/v1/sessions", {"agent": "assistant"}))
        refused = await read_response(reader)
        assert await until_closed(reader) == b""
        writer.close()
        assert refused.status == 503, refused
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        error = refused.error()
        assert error["code"] == "too_many_connections" and "max_connections" in error["message"], error
        # One held connection closes: a new one is served (once the server has seen the close).
        _, first = held.pop()
        first.close()
        await first.wait_closed()
        reader, writer = await served_connection(server)
        writer.write(request("GET", "/v1/sessions"))
        listed = await read_response(reader)
        assert listed.status == 200 and json.loads(listed.body) == []  # the refused POST reached no route
        for _, held_writer in [*held, (reader, writer)]:
            held_writer.close()


async def served_connection(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection the server has answered on, and so counts among its open ones. A
    refusal is retried: the server may not have seen the close of another yet (the start-up
    probe's, or one a test has just closed)."""
    while True:
        reader, writer = await connect(server)
        writer.write(request("GET", "/healthz"))
        response = await read_response(reader)
        if response.status == 200:
            return reader, writer
        assert response.status == 503 and response.error()["code"] == "too_many_connections", response
        writer.close()
        await asyncio.sleep(0.01)


@module_loop
async def test_serve_raises_the_open_files_limit_to_reach_max_connections(server: Server) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 + 256  # the default max_connections, and descriptors besides (cli/serve.py)
    expected = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    assert soft_open_files(server.proc.pid) == max(LOW_OPEN_FILES, expected)


@module_loop
async def test_a_request_sent_on_an_idle_connection_while_the_server_is_stopped_is_answered_and_stored(
    server: Server,
) -> None:
    """Issue 18, part 6. The server stops (SIGSTOP) for longer than its keep-alive timeout while
    waiting on an idle keep-alive connection; the client sends a POST meanwhile. When the server
    resumes, its interrupted wait returns no events, as the wait's deadline has passed: the due
    keep-alive timer ran before the request was read, and closing the socket with the request
    unread reset the connection."""
    async with asyncio.timeout(30):
        pid = server.proc.pid
        reader, writer = await connect(server)
        writer.write(request("GET", "/healthz"))
        assert (await read_response(reader)).status == 200  # the keep-alive timer is armed
        await until(pid, waiting_in_select)
        os.kill(pid, signal.SIGSTOP)
        try:
            await until(pid, stopped)
            writer.write(request("POST", "/v1/sessions", {"agent": "assistant", "metadata": {"sent": "paused"}}))
            await writer.drain()
            await asyncio.sleep(2 * KEEP_ALIVE_S)  # the pause itself, past the keep-alive deadline
        finally:
            os.kill(pid, signal.SIGCONT)
        created = await read_response(reader)
        assert created.status == 201, created
        session = json.loads(created.body)
        writer.close()
        async with client(server.base) as http:
            stored = await http.get(f"/v1/sessions/{session['id']}")
            assert stored.status_code == 200 and stored.json()["metadata"] == {"sent": "paused"}


def test_the_limits_are_settings_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no corral.toml
    for name in ("HEADER_TIMEOUT_S", "BODY_TIMEOUT_S", "KEEP_ALIVE_TIMEOUT_S", "MAX_CONNECTIONS", "CONFIG"):
        monkeypatch.delenv(f"CORRAL_{name}", raising=False)
    defaults = Settings()
    assert (defaults.header_timeout_s, defaults.body_timeout_s, defaults.keep_alive_timeout_s,
            defaults.max_connections) == (10.0, 30.0, 5.0, 4096)
    monkeypatch.setenv("CORRAL_MAX_CONNECTIONS", "2000")
    monkeypatch.setenv("CORRAL_HEADER_TIMEOUT_S", "0.5")
    loaded = load_settings()
    assert (loaded.max_connections, loaded.header_timeout_s) == (2000, 0.5)
    for wrong in ({"header_timeout_s": 0}, {"body_timeout_s": -1}, {"keep_alive_timeout_s": 0},
                  {"max_connections": 0}):
        with pytest.raises(ValidationError):
            Settings(**wrong)
