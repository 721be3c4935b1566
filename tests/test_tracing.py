"""OpenTelemetry spans: a run, its model calls and tool calls, nested; nothing at all when not configured."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from corral import tracing
from tests.helpers import client, corral_serve, new_http_session, new_session, post, wait_run
from tests.test_logs import kernel_with_bomber

LIMIT = 30


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Corral's spans go to memory for the test (the process-wide provider is left alone)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    try:
        yield memory
    finally:
        tracing.use(None)
        provider.shutdown()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_a_run_span_holds_its_model_calls_and_tool_calls(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    async with asyncio.timeout(LIMIT):
        async with kernel_with_bomber(tmp_path) as (harness, kernel):
            session = await new_session(kernel, "bomber")
            accepted = await kernel.submit(session, "/tool explode {}\n/tool note {}")
            assert (await wait_run(kernel, accepted.run_id))["status"] == "completed"
            await harness.stop()  # every run task has ended: the run span with it
    spans = exporter.get_finished_spans()
    [run] = named(spans, tracing.RUN_SPAN)
    assert run.parent is None and run.context is not None
    assert run.attributes is not None and dict(run.attributes) == {
        "corral.run.id": accepted.run_id, "corral.session.id": session, "corral.agent": "bomber",
        "corral.run.resumed": False, "corral.run.status": "completed"}
    trace_id, run_span_id = run.context.trace_id, run.context.span_id

    models = named(spans, tracing.MODEL_CALL_SPAN)
    assert len(models) == 2  # the call that asks for the tools, the one that answers with their results
    tools = {span.attributes["gen_ai.tool.name"]: span for span in named(spans, tracing.TOOL_CALL_SPAN)
             if span.attributes is not None}
    assert set(tools) == {"explode", "note"}
    for child in [*models, *tools.values()]:
        assert child.context is not None and child.context.trace_id == trace_id
        assert child.parent is not None and child.parent.span_id == run_span_id
        assert child.attributes is not None
        assert (child.attributes["corral.run.id"], child.attributes["corral.session.id"]) == (accepted.run_id, session)
    assert all(m.attributes is not None and m.attributes["gen_ai.system"] == "demo" for m in models)
    # The tool calls happen between the two model calls.
    first, second = sorted(models, key=lambda span: span.start_time or 0)
    assert all((first.end_time or 0) <= (t.start_time or 0) <= (t.end_time or 0) <= (second.start_time or 0)
               for t in tools.values())
    assert tools["explode"].status.status_code is StatusCode.ERROR
    assert "RuntimeError: boom" in (tools["explode"].status.description or "")
    assert [event.name for event in tools["explode"].events] == ["exception"]
    assert tools["note"].status.status_code is StatusCode.UNSET
    assert run.status.status_code is StatusCode.UNSET


async def test_a_failed_run_and_its_failed_model_call_are_errors(tmp_path: Path,
                                                                  exporter: InMemorySpanExporter) -> None:
    async with asyncio.timeout(LIMIT):
        async with kernel_with_bomber(tmp_path) as (harness, kernel):
            session = await new_session(kernel)
            accepted = await kernel.submit(session, "/fail")
            assert (await wait_run(kernel, accepted.run_id))["status"] == "failed"
            await harness.stop()
    spans = exporter.get_finished_spans()
    [run], [model] = named(spans, tracing.RUN_SPAN), named(spans, tracing.MODEL_CALL_SPAN)
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["corral.run.status"] == "failed"
    assert model.status.status_code is StatusCode.ERROR
    assert model.parent is not None and run.context is not None and model.parent.span_id == run.context.span_id


async def test_nothing_is_recorded_when_tracing_is_off(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    tracing.use(None)  # the provider exists, Corral was not told to use it
    assert not tracing.enabled()
    async with asyncio.timeout(LIMIT):
        async with kernel_with_bomber(tmp_path) as (harness, kernel):
            session = await new_session(kernel, "bomber")
            accepted = await kernel.submit(session, "/tool explode {}")
            await wait_run(kernel, accepted.run_id)
            await harness.stop()
    assert exporter.get_finished_spans() == ()


def test_not_configured_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure(False) is False
    assert not tracing.enabled()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.configure(False) is False
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure(True) is False


async def test_serve_exports_spans_when_the_environment_asks(tmp_path: Path) -> None:
    """``OTEL_TRACES_EXPORTER=console``: ``corral serve`` prints its spans, flushed at shutdown."""
    async with asyncio.timeout(60):
        async with corral_serve(tmp_path, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="corral-test") as server:
            async with client(server.base) as http:
                session = await new_http_session(http)
                accepted = await post(http, session, '/tool echo {"text": "hi"}')
                async with http.stream("GET", f"/v1/runs/{accepted['run_id']}/events") as response:
                    async for _ in response.aiter_lines():
                        pass  # the stream ends after the run's terminal event
            server.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.proc.wait(), 20) in (0, -signal.SIGTERM), server.log
    output = "".join(server.output)
    for name in (tracing.RUN_SPAN, tracing.MODEL_CALL_SPAN, tracing.TOOL_CALL_SPAN):
        assert f'"name": "{name}"' in output, output[-3000:]
    assert f'"corral.run.id": "{accepted["run_id"]}"' in output
    assert '"service.name": "corral-test"' in output
