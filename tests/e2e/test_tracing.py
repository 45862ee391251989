"""A real daemon exporting its traces over OTLP/HTTP to a receiver on loopback that the
test runs: the spans of a workflow started over HTTP with a `traceparent` header arrive
in the caller's trace, flushed at shutdown, and the log lines carry their ids."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from bench.tracing import otlp_receiver
from tests.e2e.conftest import Daemons, all_finished, wait_until

TOKEN = "test-token-" + uuid.uuid4().hex
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
CALLER = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"


@dataclass
class Received:
    """What the receiver was sent: each span with its resource's attributes."""

    spans: list[tuple[dict[str, Any], Span]] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ancestors(self, span: Span) -> list[bytes]:
        """The ids of the spans above `span`, among those received."""
        with self.lock:
            by_id = {each.span_id: each for _, each in self.spans}
        found, parent = [], by_id.get(span.parent_span_id)
        while parent is not None:
            found.append(parent.span_id)
            parent = by_id.get(parent.parent_span_id)
        return found

    def named(self, name: str) -> list[Span]:
        with self.lock:
            found = [span for _, span in self.spans if span.name == name]
        return sorted(found, key=lambda span: span.start_time_unix_nano)


def values(attributes: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of plain values."""
    pairs: list[KeyValue] = list(attributes)
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (the bench's): its endpoint, and what
    it received."""
    received = Received()

    def keep(request: ExportTraceServiceRequest, size: int) -> None:
        with received.lock:
            received.requests += 1
            for resource_spans in request.resource_spans:
                resource = values(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    received.spans.extend((resource, span) for span in scope_spans.spans)

    with otlp_receiver(keep) as endpoint:
        yield endpoint, received


def test_a_daemon_exports_the_callers_trace_over_otlp_and_logs_its_ids(
    daemons: Daemons, db: psycopg.Connection[Any], receiver: tuple[str, Received]
) -> None:
    endpoint, received = receiver
    # Nothing is exported until the daemon stops: the flush at shutdown must send it all.
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    daemon = daemons.start(env_extra=otel, admin_token=TOKEN)
    answer = httpx.post(
        f"{daemon.url}/admin/workflows",
        json={"type": "retrying", "input": {"fail_times": 1}, "user_id": "e2e"},
        headers={"Authorization": f"Bearer {TOKEN}", "traceparent": CALLER},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    workflow_id = answer.json()["id"]
    wait_until(lambda: all_finished(db, 1), 30, "the workflow to complete after its retry")
    assert received.requests == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0

    # The request's server span (FastAPI's) continues the caller's; both runs continue
    # the span current in the route that started the workflow; the attempts, their runs.
    (request,) = received.named("POST /admin/workflows")
    assert (request.trace_id.hex(), request.parent_span_id.hex()) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert request.kind == Span.SPAN_KIND_SERVER
    assert values(request.attributes)["http.response.status_code"] == 201
    first_run, second_run = received.named("run retrying")
    failed, succeeded = received.named("step flaky")
    assert {span.trace_id.hex() for _, span in received.spans} == {CALLER_TRACE_ID}
    assert first_run.parent_span_id == second_run.parent_span_id
    assert request.span_id in received.ancestors(first_run)
    assert (failed.parent_span_id, succeeded.parent_span_id) == (first_run.span_id, second_run.span_id)
    assert values(first_run.attributes)["workflowd.outcome"] == "retry_scheduled"
    assert values(second_run.attributes) | {"workflowd.worker.id": None} == {
        "workflowd.workflow.id": workflow_id, "workflowd.workflow.type": "retrying",
        "workflowd.workflow.version": 1, "workflowd.worker.id": None, "workflowd.compensating": False,
        "workflowd.outcome": "completed",
    }  # fmt: skip
    assert values(failed.attributes)["workflowd.step.attempt"] == 1
    assert values(failed.attributes)["workflowd.outcome"] == "failed"
    assert failed.status.code == Status.STATUS_CODE_ERROR
    (exception,) = [event for event in failed.events if event.name == "exception"]
    assert values(exception.attributes)["exception.type"] == "RuntimeError"
    assert values(succeeded.attributes)["workflowd.outcome"] == "succeeded"
    assert {resource["service.name"] for resource, _ in received.spans} == {"workflowd"}

    # Log lines written inside a span carry its ids; the others none.
    events = {event["event"]: event for event in daemon.log_events()}
    retry, completed = events["step_retry_scheduled"], events["workflow_completed"]
    assert (retry["trace_id"], retry["span_id"]) == (CALLER_TRACE_ID, failed.span_id.hex())
    assert (completed["trace_id"], completed["span_id"]) == (CALLER_TRACE_ID, succeeded.span_id.hex())
    assert "trace_id" not in events["worker_started"]
