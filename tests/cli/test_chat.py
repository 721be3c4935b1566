"""``corral chat`` in a real pseudo-terminal against a real server: streaming, Ctrl-C, modes, resume.

Every wait is on something the user would see (pexpect with a bounded timeout) or on the
API's state, never on the clock.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.cli import Server, corral_serve, kill
from tests.helpers import CORRAL, clean_env

EXPECT_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with corral_serve(tmp_path_factory.mktemp("chat")) as server:
        yield server


class Chat:
    """A ``corral chat`` process on a terminal, with everything it printed kept for later checks."""

    def __init__(self, server: Server, *args: str):
        self.transcript = io.StringIO()
        self.child = pexpect.spawn(
            str(CORRAL), ["chat", "--url", server.base, *args], encoding="utf-8", timeout=EXPECT_S,
            dimensions=(50, 200), env=clean_env(TERM="xterm"),
        )
        self.child.logfile_read = self.transcript
        self.expect("queue> ")

    def expect(self, pattern: str, timeout: float = EXPECT_S) -> re.Match[str]:
        self.child.expect(pattern, timeout=timeout)
        match = self.child.match
        assert isinstance(match, re.Match)
        return match

    def expect_exact(self, text: str, timeout: float = EXPECT_S) -> None:
        self.child.expect_exact(text, timeout=timeout)

    def send(self, line: str) -> None:
        self.child.sendline(line)

    def quit(self) -> int:
        self.child.sendeof()
        self.child.expect(pexpect.EOF, timeout=EXPECT_S)
        self.child.close()
        assert self.child.exitstatus is not None, f"killed by signal {self.child.signalstatus}"
        return int(self.child.exitstatus)

    def close(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture
def chats() -> Iterator[list[Chat]]:
    opened: list[Chat] = []
    yield opened
    for chat in opened:
        chat.close()


def open_chat(chats: list[Chat], server: Server, *args: str) -> Chat:
    chat = Chat(server, *args)
    chats.append(chat)
    return chat


def session_runs(server: Server, key: str) -> list[dict[str, Any]]:
    with server.http() as http:
        session = http.post("/v1/sessions", json={"agent": "assistant", "key": key}).json()
        runs: list[dict[str, Any]] = http.get("/v1/runs", params={"session_id": session["id"]}).json()["runs"]
    return runs


def test_streamed_answer_appears(server: Server, chats: list[Chat]) -> None:
    chat = open_chat(chats, server)
    chat.send("hello")
    chat.expect_exact("echo: hello")
    chat.expect("queue> ")
    assert chat.quit() == 0


def test_ctrl_c_soft_stops_the_active_run(server: Server, chats: list[Chat]) -> None:
    key = f"ctrl-c-{uuid.uuid4().hex[:8]}"
    chat = open_chat(chats, server, "--session", key)
    chat.send("/steps 5 2000")
    chat.expect_exact("> wait")  # the run is inside its first tool call
    chat.child.sendintr()
    chat.expect(r"stopping run_\w+ \(soft\)")
    chat.expect_exact("run cancelled")
    [run] = session_runs(server, key)
    assert run["status"] == "cancelled"
    assert run["error"]["code"] == "cancelled"
    chat.expect("queue> ")
    assert chat.quit() == 0


def test_second_ctrl_c_stops_at_once(server: Server, chats: list[Chat]) -> None:
    key = f"hard-{uuid.uuid4().hex[:8]}"
    chat = open_chat(chats, server, "--session", key)
    chat.send("/steps 3 20000")
    chat.expect_exact("> wait")
    chat.child.sendintr()
    chat.expect(r"\(soft\)")
    chat.child.sendintr()
    chat.expect(r"stopping run_\w+ \(hard\)")
    # A soft stop would wait for the 20 s tool call; only the hard stop can end the run this soon.
    chat.expect_exact("run cancelled", timeout=10)
    [run] = session_runs(server, key)
    assert run["status"] == "cancelled"
    with server.http() as http:
        events = http.get(f"/v1/runs/{run['id']}/events").text
    assert "tool.completed" not in events


def test_steer_mode_steers_the_active_run(server: Server, chats: list[Chat]) -> None:
    chat = open_chat(chats, server)
    chat.send("/mode steer")
    chat.expect("steer> ")
    chat.send("/steps 3 500")
    chat.expect_exact("> wait")  # the run is active: the next line steers it
    chat.send("also mention the weather")
    chat.expect_exact("steered: ")
    chat.expect_exact('steering seen: ["also mention the weather"]')
    chat.expect("steer> ")
    assert chat.quit() == 0


def test_approval_from_the_terminal(server: Server, chats: list[Chat]) -> None:
    name = f"careful{uuid.uuid4().hex[:6]}"
    with server.http() as http:
        response = http.post("/v1/agents", json={"name": name, "policy": {"approvals": {"wait": "ask"}}})
        assert response.status_code == 201, response.text
    chat = open_chat(chats, server, name)
    chat.send('/tool wait {"ms": 10}')
    chat.expect_exact("approval needed")
    chat.expect_exact("type /approve or /deny")
    chat.send("/approve")
    chat.expect_exact("tool results: waited 10 ms")
    chat.send('/tool wait {"ms": 10}')
    call_id = chat.expect(r"\(call (call_\w+)\)").group(1)
    chat.send(f"/deny {call_id}")
    chat.expect_exact("tool results: error: the call to wait was denied by a human")
    assert chat.quit() == 0


def test_sessions_switch_and_reject_mode(server: Server, chats: list[Chat]) -> None:
    key = f"other-{uuid.uuid4().hex[:8]}"
    chat = open_chat(chats, server)
    chat.send(f"/switch {key}")
    chat.expect(rf"session (ses_\w+) \(key {key}\)")
    chat.send("/sessions")
    chat.expect(rf"\*\s+ses_\w+\s+assistant\s+{key}")
    chat.send("/mode reject")
    chat.expect("reject> ")
    chat.send("/steps 2 1000")
    chat.expect_exact("> wait")
    chat.send("not now")
    chat.expect(r"error: .*busy")  # 409: the chat reports it and goes on
    chat.send("/mode nonsense")
    chat.expect_exact("unknown mode")
    chat.send("/stop")
    chat.expect_exact("run cancelled")
    assert chat.quit() == 0


def test_ctrl_c_at_idle_hints_then_leaves(server: Server, chats: list[Chat]) -> None:
    chat = open_chat(chats, server)
    chat.child.sendintr()
    chat.expect_exact("Ctrl-D or /quit leaves")
    chat.child.sendintr()
    chat.child.expect(pexpect.EOF, timeout=EXPECT_S)
    chat.child.close()
    assert chat.child.exitstatus == 0


def test_stream_resumes_after_a_server_restart(tmp_path: Path, chats: list[Chat]) -> None:
    data = tmp_path / "data"
    with corral_serve(data) as first:
        chat = open_chat(chats, first, "--session", "restart")
        chat.send("hello before")
        chat.expect_exact("echo: hello before")
        chat.expect("queue> ")
        kill(first)
        chat.expect_exact("connection lost; reconnecting")
    with corral_serve(data, port=first.port):
        chat.expect_exact("reconnected", timeout=15)
        chat.send("hello after")
        chat.expect_exact("echo: hello after")
        chat.expect("queue> ")
        assert chat.quit() == 0
    # Resuming with Last-Event-ID replays nothing already shown.
    assert chat.transcript.getvalue().count("echo: hello before") == 1
