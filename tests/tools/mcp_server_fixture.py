"""A real MCP server for the MCP tool tests.

``python tests/tools/mcp_server_fixture.py`` serves over stdio; ``--http PORT`` serves
streamable HTTP on 127.0.0.1:PORT at ``/mcp``. Tools: ``add(a, b)``, ``slow(ms)`` (sleeps,
so a test can time a call out or cancel it) and ``pid()`` (so a test can kill the process
it is talking to). ``--pid-file PATH`` writes the PID first thing, before the slow imports,
so a test can find a server that has not answered yet.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on this loopback port")
parser.add_argument("--pid-file", type=Path, help="write the process id here before anything else")
args = parser.parse_args()
if args.pid_file is not None:
    args.pid_file.write_text(str(os.getpid()))

import asyncio  # noqa: E402  (after the PID file: the point is to write it early)

from mcp.server.mcpserver import MCPServer  # noqa: E402

server = MCPServer("corral-test-fixture")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
async def slow(ms: int) -> str:
    """Sleep for ``ms`` milliseconds, then say so."""
    await asyncio.sleep(ms / 1000)
    return f"slept {ms} ms"


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    if args.http is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
