"""The helpers test modules share, imported from here (``from tests.helpers import ...``):

- ``kernel``: a kernel in its own task, the sessions and agents tests use, and reading back what
  it did, synchronised on events;
- ``http``: a real server on loopback, a client, Server-Sent Events parsed by the WHATWG rules,
  and the REST calls tests make;
- ``processes``: ``corral serve`` as a real process, and whether a process is still alive;
- ``postgres``: dropping a database on the test Postgres server that connections may still hold.
"""

from tests.helpers.http import (
    TERMINAL_EVENTS,
    Frame,
    assert_contiguous,
    assert_error,
    check_frame,
    client,
    create_agent,
    free_port,
    http_server,
    new_http_session,
    parse_sse,
    post,
    raw_sse_lines,
    read_run,
    read_session_until,
    sse_frames,
    until_event,
    uvicorn_server,
)
from tests.helpers.kernel import (
    GATED,
    PARK,
    POLL_S,
    TERMINAL,
    KernelHarness,
    agent_session,
    first_event,
    get_run,
    new_session,
    park,
    ready_agent,
    run_events,
    select_all,
    select_scalar,
    seq_of,
    session_events,
    sqlite_url,
    stored_events,
    until,
    wait_event,
    wait_run,
)
from tests.helpers.postgres import drop_database
from tests.helpers.processes import CORRAL, STARTUP_DEADLINE_S, Server, alive, clean_env, corral_serve, until_gone

__all__ = [
    "CORRAL", "GATED", "PARK", "POLL_S", "STARTUP_DEADLINE_S", "TERMINAL", "TERMINAL_EVENTS", "Frame",
    "KernelHarness", "Server", "agent_session", "alive", "assert_contiguous", "assert_error", "check_frame",
    "clean_env", "client", "corral_serve", "create_agent", "drop_database", "first_event", "free_port",
    "get_run", "http_server", "new_http_session", "new_session", "park", "parse_sse", "post", "raw_sse_lines",
    "read_run", "read_session_until", "ready_agent", "run_events", "select_all", "select_scalar", "seq_of",
    "session_events", "sqlite_url", "sse_frames", "stored_events", "until", "until_event", "until_gone",
    "uvicorn_server", "wait_event", "wait_run",
]
