"""When the daemon traces (the OTEL_* rule), what it makes of a stored traceparent, the
ids it adds to log lines, the trace context of admin requests, and a bounded shutdown."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from daemon.settings import ConfigurationError
from daemon.tracing import (
    OncePerInterval,
    RequestTraceContext,
    Tracing,
    add_trace_ids,
    tracer_provider,
    tracing_config,
    untraced_request,
    workflow_trace_id,
)
from engine.traceparent import current_traceparent, parent_context

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ENDPOINT = "http://127.0.0.1:4318"


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "payments", "OTEL_TRACES_SAMPLER": "always_on"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "Console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "console, otlp,console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, None),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "console"}, None),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ("otlp",),
        ),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask_for_it(
    environ: dict[str, str], exporters: tuple[str, ...] | None
) -> None:
    config = tracing_config(environ)
    assert (config.exporters if config else None) == exporters


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "http/json",
        ),
    ],
)  # fmt: skip
def test_an_exporter_it_cannot_serve_is_a_configuration_error(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        tracing_config(environ)


def test_the_service_is_workflowd_unless_the_environment_names_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracer_provider().resource.attributes["service.name"] == "workflowd"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=billing,deployment.environment=prod")
    attributes = tracer_provider().resource.attributes
    assert (attributes["service.name"], attributes["deployment.environment"]) == ("billing", "prod")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments")
    assert tracer_provider().resource.attributes["service.name"] == "payments"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = tracer_provider(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def test_a_start_stores_the_current_spans_context_and_nothing_without_one(provider: TracerProvider) -> None:
    assert current_traceparent() is None
    with provider.get_tracer("test").start_as_current_span("caller") as span:
        context = span.get_span_context()
        stored = current_traceparent()
    assert stored is not None
    assert stored.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")


@pytest.mark.parametrize(
    "stored", [None, "", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"]
)
def test_a_missing_or_invalid_traceparent_is_no_parent(stored: str | None) -> None:
    assert parent_context(stored) is None


def test_a_stored_traceparent_is_a_remote_parent() -> None:
    context = parent_context(CALLER)
    assert context is not None
    parent = trace.get_current_span(context).get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True,
    )  # fmt: skip


def test_an_untraced_workflows_trace_id_is_derived_from_its_id() -> None:
    workflow_id = uuid.uuid4()
    assert workflow_trace_id(workflow_id) == workflow_trace_id(uuid.UUID(str(workflow_id)))
    assert workflow_trace_id(workflow_id) != workflow_trace_id(uuid.uuid4())
    assert 0 < workflow_trace_id(workflow_id) < 2**128
    assert workflow_trace_id(workflow_id) != workflow_id.int


def test_log_lines_carry_the_current_spans_ids(provider: TracerProvider) -> None:
    assert add_trace_ids(None, "info", {"event": "outside"}) == {"event": "outside"}
    with provider.get_tracer("test").start_as_current_span("inside") as span:
        line = add_trace_ids(None, "info", {"event": "inside"})
    context = span.get_span_context()
    assert line == {
        "event": "inside",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


def admin_app(provider: TracerProvider | None) -> httpx.AsyncClient:
    """An app set up as create_app sets up the daemon's (FastAPI's telemetry, then the
    middleware), whose routes answer with the traceparent a start would store; FastAPI
    traces with `provider` (None: the global one, which no unit test installs)."""
    telemetry: dict[str, Any] = {"exclude": untraced_request}
    if provider is not None:
        telemetry["tracer_provider"] = provider
    app = FastAPI(telemetry=telemetry)
    app.add_middleware(RequestTraceContext)

    @app.post("/admin/workflows")
    async def start() -> str:
        return current_traceparent() or "none"

    @app.get("/livez")
    async def livez() -> str:
        return current_traceparent() or "none"

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://daemon")


async def test_without_tracing_an_admin_request_passes_its_traceparent_to_a_start() -> None:
    async with admin_app(None) as client:
        assert (await client.post("/admin/workflows", headers={"traceparent": CALLER})).json() == CALLER
        assert (await client.post("/admin/workflows")).json() == "none"
        assert (await client.get("/livez", headers={"traceparent": CALLER})).json() == "none"


async def test_with_tracing_a_start_continues_fastapis_span_of_the_request(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with admin_app(provider) as client:
        stored = (await client.post("/admin/workflows", headers={"traceparent": CALLER})).json()
        assert (await client.get("/livez", headers={"traceparent": CALLER})).json() == "none"
    spans = {span.context.span_id: span for span in exporter.get_finished_spans() if span.context}
    (server,) = [span for span in spans.values() if span.kind == SpanKind.SERVER]
    assert server.name == "POST /admin/workflows"  # and none for /livez
    assert server.parent is not None
    assert server.parent.span_id == 0xB7AD6B7169203331
    _, trace_id, span_id, _ = stored.split("-")
    assert int(trace_id, 16) == 0x0AF7651916CD43DD8448EB211C80319C
    # The stored span is the server span or one of its descendants.
    ancestors, current = [], spans.get(int(span_id, 16))
    while current is not None:
        ancestors.append(current.name)
        current = spans.get(current.parent.span_id) if current.parent else None
    assert "POST /admin/workflows" in ancestors


class StuckProcessor(SpanProcessor):
    """An exporter's processor whose collector never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        self.release.wait(10)


def test_shutdown_waits_for_the_exporters_a_bounded_time() -> None:
    stuck = StuckProcessor()
    tracing = Tracing(tracer_provider(stuck))
    started = time.monotonic()
    assert tracing.shutdown(timeout_seconds=0.2) is False
    assert time.monotonic() - started < 2
    stuck.release.set()
    assert Tracing(tracer_provider(SimpleSpanProcessor(InMemorySpanExporter()))).shutdown() is True


def test_the_sdks_warnings_are_let_through_once_a_minute_each() -> None:
    once = OncePerInterval(60)

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.sdk", logging.WARNING, __file__, 1, message, (), None)

    assert once.filter(record("Queue full, dropping %s."))
    assert not once.filter(record("Queue full, dropping %s."))
    assert once.filter(record("Failed to export span batch"))
