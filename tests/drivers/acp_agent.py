"""A small ACP agent for the tests, written with the agent-client-protocol SDK.

Run as a program (``python acp_agent.py``); Corral starts it like any external agent. It
records its pid in ``pids/`` under its working directory, so a test can tell which of the
processes it ever started are still alive.

Environment: ``ACP_INIT_DELAY`` (seconds ``initialize`` takes), ``ACP_FAIL_INIT`` (answer
``initialize`` with an error). A prompt is a command:

- ``ask TOOL``: ask permission for TOOL, then say what the human chose;
- ``slow N``: stream N words, one every 50 ms, stopping early on ``session/cancel``;
- ``stubborn``: stream one word, then ignore ``session/cancel`` and never finish;
- ``tool``: report a tool call that starts and completes;
- ``count``: say how many prompts this session has had (the agent's own memory);
- ``exit``: exit with code 3 in the middle of the prompt;
- ``chatty N``: write N lines of 1 KB to stderr, then answer;
- ``env NAME``: say the value of an environment variable (or ``unset``);
- anything else: echo it back, word by word.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from acp import (
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    run_agent,
    start_tool_call,
    text_block,
    tool_content,
    update_agent_message_text,
    update_tool_call,
)
from acp.schema import AllowedOutcome, PermissionOption, ToolCallUpdate


class TestAgent:
    def __init__(self) -> None:
        self.conn: Any = None
        self.prompts: dict[str, int] = {}
        self.cancelled: dict[str, asyncio.Event] = {}

    def on_connect(self, conn: Any) -> None:
        self.conn = conn

    async def initialize(self, protocol_version: int, **kwargs: Any) -> InitializeResponse:
        await asyncio.sleep(float(os.environ.get("ACP_INIT_DELAY", "0")))
        if os.environ.get("ACP_FAIL_INIT"):
            raise RequestError.internal_error({"details": "no credentials configured"})
        return InitializeResponse(protocol_version=protocol_version)

    async def new_session(self, cwd: str, **kwargs: Any) -> NewSessionResponse:
        session_id = uuid.uuid4().hex
        self.prompts[session_id] = 0
        self.cancelled[session_id] = asyncio.Event()
        return NewSessionResponse(session_id=session_id)

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        self.cancelled[session_id].set()

    async def say(self, session_id: str, text: str) -> None:
        await self.conn.session_update(session_id, update_agent_message_text(text))

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> PromptResponse:
        self.prompts[session_id] += 1
        cancelled = self.cancelled[session_id]
        cancelled.clear()
        text = " ".join(block.text for block in prompt if getattr(block, "type", None) == "text")
        command, _, rest = text.partition(" ")
        if command == "ask":
            await self.ask(session_id, rest or "write_file")
        elif command == "slow":
            for index in range(int(rest)):
                if cancelled.is_set():
                    return PromptResponse(stop_reason="cancelled")
                await self.say(session_id, f"w{index} ")
                await asyncio.sleep(0.05)
        elif command == "stubborn":
            await self.say(session_id, "working ")
            await asyncio.Event().wait()
        elif command == "tool":
            await self.conn.session_update(session_id, start_tool_call("t1", "read notes.txt", kind="read",
                                                                       raw_input={"path": "notes.txt"}))
            await self.conn.session_update(session_id, update_tool_call(
                "t1", status="completed", content=[tool_content(text_block("three lines"))]))
            await self.say(session_id, "read it")
        elif command == "count":
            await self.say(session_id, f"prompt {self.prompts[session_id]}")
        elif command == "exit":
            await self.say(session_id, "bye ")
            os._exit(3)
        elif command == "chatty":
            for index in range(int(rest)):
                sys.stderr.write(f"line {index} " + "x" * 1024 + "\n")
            sys.stderr.flush()
            await self.say(session_id, "done talking")
        elif command == "env":
            await self.say(session_id, os.environ.get(rest, "unset"))
        else:
            for word in text.split():
                await self.say(session_id, word + " ")
        return PromptResponse(stop_reason="end_turn")

    async def ask(self, session_id: str, tool: str) -> None:
        options = [PermissionOption(option_id="yes", name="Allow", kind="allow_once"),
                   PermissionOption(option_id="no", name="Reject", kind="reject_once")]
        call = ToolCallUpdate(tool_call_id="call-1", title=tool, raw_input={"path": "out.txt"})
        response = await self.conn.request_permission(session_id, call, options)
        outcome = response.outcome
        if isinstance(outcome, AllowedOutcome):
            await self.say(session_id, "allowed" if outcome.option_id == "yes" else "rejected")
        else:
            await self.say(session_id, "cancelled")


def main() -> None:
    pids = Path.cwd() / "pids"
    pids.mkdir(exist_ok=True)
    (pids / str(os.getpid())).touch()
    asyncio.run(run_agent(TestAgent()))


if __name__ == "__main__":
    main()
