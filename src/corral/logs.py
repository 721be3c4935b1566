"""Logging: one handler on the root logger, JSON lines or a human format, run and session ids.

Every line a run causes should say which run and session it belongs to, without passing ids
to each ``log.info``: the ids live in context variables, bound once when a run's task starts
(``bind_run``). asyncio copies the context into every task a run creates (its tool calls,
its provider stream), so all of them log with the ids; a ``Filter`` on the handler copies
them onto each record, where any formatter (ours, or a user's ``%(run_id)s``) can read them.

What a line may carry is fixed (time, level, logger, message, ids, exception text): no
``extra`` fields or call arguments are dumped, so nothing reaches the log unless some code
wrote it into a message on purpose; request headers (and so API tokens) never are.

The ASGI middleware that binds a request's session or run id is ``corral.api.request_log``:
this module is imported by the kernel and the CLI, which need no web framework.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "json", "human"]

run_id_var: ContextVar[str | None] = ContextVar("corral_run_id", default=None)
session_id_var: ContextVar[str | None] = ContextVar("corral_session_id", default=None)

# uvicorn's loggers: their own handlers are removed so their lines go through ours.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def bind_run(run_id: str, session_id: str) -> None:
    """Tag every line logged from here on, in this task and the tasks it creates, with the run.

    Meant for the first line of a run's task: the binding dies with the task's context, so
    there is nothing to unbind.
    """
    run_id_var.set(run_id)
    session_id_var.set(session_id)


class ContextFilter(logging.Filter):
    """Copies the bound run and session ids onto each record (``None`` outside a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "run_id"):
            record.run_id = run_id_var.get()
        if not hasattr(record, "session_id"):
            record.session_id = session_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts, level, logger, message`` [``run_id, session_id, exception, stack``]."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("run_id", "session_id"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            # Formatted once per record and cached, as logging.Formatter does.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class HumanFormatter(logging.Formatter):
    """The classic ``time LEVEL logger: message`` line, with ``[run=… session=…]`` inside a run."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        run_id, session_id = getattr(record, "run_id", None), getattr(record, "session_id", None)
        parts = ([f"run={run_id}"] if run_id else []) + ([f"session={session_id}"] if session_id else [])
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return super().formatMessage(record)


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "human"]:
    """``auto``: a person reads a terminal, a program reads everything else (journald, a collector)."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "human" if isatty is not None and isatty() else "json"


def configure_logging(level: str, fmt: LogFormat = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Install Corral's handler on the root logger and route uvicorn's loggers through it.

    Idempotent: a handler installed by an earlier call is replaced, others (pytest's, a host
    application's) are left alone. Returns the handler, so a caller can remove it again.
    uvicorn must then be started with ``log_config=None``, or it installs its own handlers.
    """
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.set_name("corral")
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, target) == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "corral"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    # httpx logs every request at INFO: a node's forwarded requests and provider calls would
    # drown the service's own lines (their outcomes are in the metrics).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    return handler

