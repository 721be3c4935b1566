"""Logs: JSON lines with the run and session of whatever logged them, a human format on a terminal."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from corral.kernel import Kernel, KernelConfig
from corral.logs import LogFormat, bind_run, configure_logging
from corral.settings import default_agent
from corral.specs import AgentSpec
from corral.tools import Tool, ToolContext, default_registry
from tests.helpers import KernelHarness, client, corral_serve, new_http_session, new_session, post, sqlite_url, wait_run

LIMIT = 30
tool_log = logging.getLogger("tests.explode")


class NoArguments(BaseModel):
    pass


async def explode(_args: NoArguments, context: ToolContext) -> str:
    tool_log.warning("about to explode in %s", context.agent)
    raise RuntimeError("boom")


async def note(_args: NoArguments, _context: ToolContext) -> str:
    tool_log.info("noted")
    return "noted"


BOMBER = AgentSpec(name="bomber", tools=["explode", "note"])


@asynccontextmanager
async def kernel_with_bomber(tmp_path: Path) -> AsyncIterator[tuple[KernelHarness, Kernel]]:
    """A kernel whose agent ``bomber`` has a tool that logs then fails, and one that logs and succeeds."""
    tools = default_registry()
    tools.add(Tool("explode", "logs a warning, then raises", NoArguments, explode))
    tools.add(Tool("note", "logs a line", NoArguments, note))
    harness = KernelHarness(sqlite_url(tmp_path), KernelConfig(shutdown_grace_s=1.0),
                            agents=(default_agent(), BOMBER), tools=tools)
    kernel = await harness.start()
    try:
        yield harness, kernel
    finally:
        await harness.stop()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextmanager
def captured(fmt: LogFormat, stream: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """Corral's handler writing to a string for the test's duration; the root logger restored after."""
    stream = stream if stream is not None else io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("info", fmt, stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_a_tool_logs_with_its_run_and_session_and_a_failure_carries_the_traceback(tmp_path: Path) -> None:
    with captured("json") as out:
        async with asyncio.timeout(LIMIT), kernel_with_bomber(tmp_path) as (_, kernel):
            session = await new_session(kernel, "bomber")
            accepted = await kernel.submit(session, "/tool explode {}\n/tool note {}")
            run = await wait_run(kernel, accepted.run_id)
            assert "boom" in run["output"]
        logging.getLogger("tests").info("after the run")
    lines = json_lines(out.getvalue())
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    by_message = {line["message"]: line for line in lines}
    warned = by_message["about to explode in bomber"]
    assert (warned["level"], warned["logger"]) == ("warning", "tests.explode")
    assert (warned["run_id"], warned["session_id"]) == (accepted.run_id, session)
    assert (by_message["noted"]["run_id"], by_message["noted"]["session_id"]) == (accepted.run_id, session)
    failed = by_message["tool explode failed"]
    assert (failed["level"], failed["logger"], failed["run_id"]) == ("error", "corral.loop.runner", accepted.run_id)
    assert failed["exception"].startswith("Traceback") and "RuntimeError: boom" in failed["exception"]
    after = by_message["after the run"]
    assert "run_id" not in after and "session_id" not in after and "exception" not in after


async def test_two_sessions_running_at_once_keep_their_own_ids(tmp_path: Path) -> None:
    with captured("json") as out:
        async with asyncio.timeout(LIMIT), kernel_with_bomber(tmp_path) as (_, kernel):
            sessions = [await new_session(kernel, "bomber") for _ in range(3)]
            accepted = [await kernel.submit(s, "/tool note {}") for s in sessions]
            await asyncio.gather(*(wait_run(kernel, a.run_id) for a in accepted))
    noted = {(line["session_id"], line["run_id"]) for line in json_lines(out.getvalue()) if line["message"] == "noted"}
    assert noted == {(s, a.run_id) for s, a in zip(sessions, accepted, strict=True)}


def test_auto_is_human_on_a_terminal_and_json_otherwise() -> None:
    log = logging.getLogger("tests.format")

    async def in_a_run() -> None:
        bind_run("run_1", "ses_1")
        log.info("inside %s", "a run")

    with captured("auto", Terminal()) as tty:
        asyncio.run(in_a_run())
        log.info("outside")
    inside, outside = tty.getvalue().splitlines()
    assert inside.endswith(" INFO tests.format [run=run_1 session=ses_1]: inside a run")
    assert outside.endswith(" INFO tests.format: outside")
    with captured("auto") as pipe:
        log.info("piped")
    assert json_lines(pipe.getvalue())[0]["message"] == "piped"
    with captured("json", Terminal()) as forced:
        log.info("forced")
    assert json_lines(forced.getvalue())[0]["message"] == "forced"
    with captured("human") as human:
        log.info("plain")
    assert human.getvalue().rstrip().endswith(" INFO tests.format: plain")


def test_bound_ids_do_not_leak_out_of_the_task_that_bound_them() -> None:
    async def main() -> None:
        async def run() -> None:
            bind_run("run_1", "ses_1")
            logging.getLogger("tests").info("in the run")

        await asyncio.create_task(run())
        logging.getLogger("tests").info("beside it")

    with captured("json") as out:
        asyncio.run(main())
    in_run, beside = json_lines(out.getvalue())
    assert in_run["run_id"] == "run_1" and "run_id" not in beside


async def test_serve_logs_json_lines_uvicorns_included_with_request_ids(tmp_path: Path) -> None:
    """The real ``corral serve``, its output piped: every line is JSON, uvicorn's startup and access too."""
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path, CORRAL_LOG_LEVEL="info") as server:
            async with client(server.base) as http:
                session = await new_http_session(http)
                accepted = await post(http, session, "hello")
                assert (await http.get(f"/v1/runs/{accepted['run_id']}")).status_code == 200
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.proc.wait(), 20)
    lines = json_lines("".join(server.output))
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers
    assert any("Application startup complete" in line["message"] for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    posted = next(line for line in access if f"POST /v1/sessions/{session}/messages" in line["message"])
    assert posted["session_id"] == session
    fetched = next(line for line in access if f"GET /v1/runs/{accepted['run_id']}" in line["message"])
    assert fetched["run_id"] == accepted["run_id"]
