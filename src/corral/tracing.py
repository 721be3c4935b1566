"""Optional OpenTelemetry spans: a run, and within it each model call and each tool call.

Off unless the OpenTelemetry SDK is installed (``pip install 'corral[otel]'``) and configured:
the ``otel`` setting, the standard ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*``
variables, or a tracer provider already set by ``opentelemetry-instrument``. Off, every hook
costs one check of the module-level ``_active`` and nothing is imported.

The tracer is process-wide state, unlike the rest of Corral's collaborators, because that is
OpenTelemetry's own model: one global provider, and the current span carried in context
variables. That same context is what nests the spans: ``start_run`` makes the run span
current in the run's task, and asyncio copies it into every task the run creates.

Span names and attributes are listed in docs/observability.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, nullcontext
from importlib.metadata import entry_points
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from corral import __version__
from corral.errors import InvalidInput
from corral.logs import run_id_var, session_id_var
from corral.types import RunStatus

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

log = logging.getLogger(__name__)

RUN_SPAN, MODEL_CALL_SPAN, TOOL_CALL_SPAN = "corral.run", "corral.model_call", "corral.tool_call"


class _Active:
    """The OpenTelemetry API, imported once tracing is on, and Corral's tracer."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry import context, trace

        self.context = context
        self.trace = trace
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("corral", __version__)


_active: _Active | None = None
_OFF: AbstractAsyncContextManager[None] = nullcontext()


def use(provider: TracerProvider | None) -> None:
    """Send Corral's spans to ``provider`` from now on; ``None`` turns them off.

    ``configure`` calls it at start; tests call it with a provider of their own.
    """
    global _active
    _active = _Active(provider) if provider is not None else None


def enabled() -> bool:
    return _active is not None


def configure(otel: bool) -> bool:
    """Turn spans on if asked (``otel``) or if the environment configures OpenTelemetry.

    Asked explicitly, a missing SDK is an error; asked only by ``OTEL_*`` variables, which may
    be meant for other programs, it is noted in the log. Returns whether spans are on.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        use(None)
        return False
    if "opentelemetry.sdk.trace" in sys.modules:  # opentelemetry-instrument may have set one up
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider

        existing = trace.get_tracer_provider()
        if isinstance(existing, SdkProvider):
            use(existing)
            return True
    if not (otel or _env_configures()):
        use(None)
        return False
    try:
        provider = _build_provider()
    except ImportError as exc:
        if otel:
            raise InvalidInput("otel is on but the OpenTelemetry SDK is not installed: "
                               "pip install 'corral[otel]'") from exc
        log.info("OTEL_* variables are set but the OpenTelemetry SDK is not installed: no spans")
        use(None)
        return False
    from opentelemetry import trace

    trace.set_tracer_provider(provider)  # other instrumentation in the process shares it
    use(provider)
    return True


async def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still batched: at shutdown, since a signal may end the process before atexit."""
    active = _active
    force_flush = getattr(active.provider, "force_flush", None) if active is not None else None
    if force_flush is not None:
        await asyncio.to_thread(force_flush, int(timeout_s * 1000))  # the exporter's I/O is blocking


def _env_configures() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _build_provider() -> TracerProvider:
    """An SDK provider exporting, batched, to each exporter ``OTEL_TRACES_EXPORTER`` names (default otlp).

    Exporters are found by their standard entry points, so any installed one works: ``console``
    comes with the SDK, ``otlp`` with ``corral[otel]``. The SDK reads the other ``OTEL_*``
    variables itself (endpoint, headers, sampler, resource attributes).
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = SdkProvider(resource=Resource.create({} if named else {"service.name": "corral"}))
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    for name in (_entry_point_name(n) for n in names if n and n != "none"):
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise InvalidInput(f"no OpenTelemetry span exporter {name!r} is installed "
                               "(for otlp: pip install 'corral[otel]')")
        exporter_class = next(iter(found)).load()
        provider.add_span_processor(BatchSpanProcessor(exporter_class()))
    return provider


def _entry_point_name(exporter: str) -> str:
    """``otlp`` is one of two exporters, by the protocol the standard variables name (http by default)."""
    if exporter != "otlp":
        return exporter
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"


# --- spans ------------------------------------------------------------------------------


class _Run(Protocol):
    @property
    def run_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def status(self) -> RunStatus: ...


def start_run(run: _Run, agent: str, *, resumed: bool) -> None:
    """Open the run span and make it current in the calling task; it ends when the task does.

    Call it from the run's own task (``Kernel._drive``). The span is a root: a run outlives
    whatever started it (a request, the run before it, a parent run's tool call), so that
    origin is a link rather than a parent.
    """
    active = _active
    task = asyncio.current_task()
    if active is None or task is None:
        return
    origin = active.trace.get_current_span().get_span_context()
    links = [active.trace.Link(origin)] if origin.is_valid else None
    span = active.tracer.start_span(RUN_SPAN, context=active.context.Context(), links=links, attributes={
        "corral.run.id": run.run_id, "corral.session.id": run.session_id, "corral.agent": agent,
        "corral.run.resumed": resumed})
    active.context.attach(active.trace.set_span_in_context(span))  # the task's context dies with it
    task.add_done_callback(functools.partial(_end_run, active, span, run))


def _end_run(active: _Active, span: Span, run: _Run, _task: asyncio.Task[Any]) -> None:
    """A run's task ended: parked for an approval (``waiting``) or with the run over."""
    span.set_attribute("corral.run.status", run.status.value)
    if run.status is RunStatus.FAILED:
        span.set_status(active.trace.Status(active.trace.StatusCode.ERROR, "run failed"))
    span.end()


def model_call(provider: str, model: str | None, *,
               benign: tuple[type[BaseException], ...] = ()) -> AbstractAsyncContextManager[None]:
    """A span around one model call; ``benign`` exceptions (a soft stop) are not errors."""
    active = _active
    if active is None:
        return _OFF
    attributes: dict[str, Any] = {"gen_ai.system": provider, "gen_ai.operation.name": "chat"}
    if model is not None:
        attributes["gen_ai.request.model"] = model
    return _Scope(active, MODEL_CALL_SPAN, attributes, benign)


class _ToolCall(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...


S = TypeVar("S")
C = TypeVar("C", bound=_ToolCall)


def tool_call(method: Callable[[S, C], Coroutine[Any, Any, str]]) -> Callable[[S, C], Coroutine[Any, Any, str]]:
    """Decorate ``StepLoop._run_one``: a span around each tool call (``record_error`` marks it failed)."""

    @functools.wraps(method)
    async def traced(self: S, call: C) -> str:
        active = _active
        if active is None:
            return await method(self, call)
        attributes = {"gen_ai.tool.name": call.name, "gen_ai.tool.call.id": call.id}
        async with _Scope(active, TOOL_CALL_SPAN, attributes, ()):
            return await method(self, call)

    return traced


def record_error(exc: BaseException) -> None:
    """Mark the current span failed with ``exc``: for errors that are handled, not raised through it."""
    active = _active
    if active is None:
        return
    span = active.trace.get_current_span()
    span.record_exception(exc)
    span.set_status(active.trace.Status(active.trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class _Scope:
    """A child span of the current one, current while the ``async with`` body runs."""

    def __init__(self, active: _Active, name: str, attributes: dict[str, Any],
                 benign: tuple[type[BaseException], ...]):
        self._active = active
        self._benign = benign
        run_id, session_id = run_id_var.get(), session_id_var.get()
        if run_id is not None:
            attributes["corral.run.id"] = run_id
        if session_id is not None:
            attributes["corral.session.id"] = session_id
        self._name = name
        self._attributes = attributes

    async def __aenter__(self) -> None:
        self._span = self._active.tracer.start_span(self._name, attributes=self._attributes)
        self._token = self._active.context.attach(self._active.trace.set_span_in_context(self._span))

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._active.context.detach(self._token)
        if isinstance(exc, asyncio.CancelledError):
            self._span.set_attribute("corral.cancelled", True)
        elif isinstance(exc, Exception) and not isinstance(exc, self._benign):
            self._span.record_exception(exc)
            self._span.set_status(self._active.trace.Status(self._active.trace.StatusCode.ERROR,
                                                            f"{type(exc).__name__}: {exc}"))
        self._span.end()
