"""Traces of workflows driven by a real worker on a real database, read back from the
SDK's in-memory exporter: the run and attempt spans, their parents, the trace they share
with whoever started the workflow, their attributes and recorded exceptions; and, with
no OTEL_* variables, no tracing at all."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer
from psycopg_pool import AsyncConnectionPool

from daemon.tracing import Tracing, start_tracing, tracer_provider, workflow_trace_id
from daemon.worker import Worker, WorkerConfig
from engine import PermanentError, Step, Workflow, WorkflowContext, WorkflowService
from engine.registry import Registry
from engine.retry import RetryPolicy
from tests.factories import insert_workflow

FAST_RETRIES = RetryPolicy(base_delay_seconds=0.05, max_delay_seconds=0.05, jitter_ratio=0)


async def flaky(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("first attempts fail")
    return {"attempt": ctx.attempt}


# The tracer of the steps' own code: the test's provider's.
USER_TRACER: dict[str, Tracer] = {}


def in_a_thread(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """A plain function (the daemon's thread pool) with a span of its own."""
    with USER_TRACER["tracer"].start_as_current_span("user work"):
        return {"thread": threading.current_thread().name}


async def declined(input: dict[str, Any], ctx: WorkflowContext) -> None:
    raise PermanentError("card declined")


TRACED = Workflow(type="traced", steps=[Step("flaky", flaky), Step("threaded", in_a_thread)], max_retries=2)
DOOMED = Workflow(type="doomed", steps=[Step("charge", declined)])
REGISTRY = Registry([TRACED, DOOMED])


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """The daemon's kind of provider, exporting to memory (not the global one: a process
    may set that once, and the tests without tracing check that it is not set)."""
    provider = tracer_provider(SimpleSpanProcessor(exporter))
    USER_TRACER["tracer"] = provider.get_tracer("user code")
    try:
        yield provider
    finally:
        USER_TRACER.clear()
        provider.shutdown()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
        yield pool


async def drive_until_finished(
    pool: AsyncConnectionPool, db_url: str, service: WorkflowService, ids: list[UUID], tracing: Tracing | None
) -> None:
    """A real worker, in this process, until every workflow of `ids` is finished."""
    config = WorkerConfig(
        concurrency=4, lease_seconds=10, poll_interval=0.05, shutdown_grace=2, retry_policy=FAST_RETRIES
    )
    worker = Worker(pool, db_url, REGISTRY, config, tracing=tracing)
    running = asyncio.create_task(worker.run())
    try:
        for workflow_id in ids:
            await service.wait_for(workflow_id, timeout=20)
    finally:
        worker.request_stop()
        await running


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted((span for span in spans if span.name == name), key=lambda span: span.start_time or 0)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def exception_of(span: ReadableSpan) -> dict[str, Any]:
    (event,) = [event for event in span.events if event.name == "exception"]
    return dict(event.attributes or {})


async def test_runs_and_attempts_continue_the_trace_of_the_python_call_that_started_them(
    provider: TracerProvider, exporter: InMemorySpanExporter, pool: AsyncConnectionPool, db_url: str,
    service: WorkflowService, db: psycopg.Connection[Any],
) -> None:  # fmt: skip
    service.registry = REGISTRY
    with provider.get_tracer("caller").start_as_current_span("caller") as caller:
        traced = (await service.start("traced", {"n": 1}, "u1")).workflow
        doomed = (await service.start("doomed", {"n": 2}, "u1")).workflow
    await drive_until_finished(pool, db_url, service, [traced.id, doomed.id], Tracing(provider))
    spans = exporter.get_finished_spans()
    caller_context = caller.get_span_context()

    # The row holds the caller's context; every span is in the caller's trace.
    (stored,) = db.execute("SELECT traceparent FROM workflows WHERE id = %s", (traced.id,)).fetchone() or ()
    flags = int(caller_context.trace_flags)
    assert stored == f"00-{caller_context.trace_id:032x}-{caller_context.span_id:016x}-{flags:02x}"
    assert {trace_id(span) for span in spans} == {caller_context.trace_id}

    # Two runs of `traced` (the retry came back as a second run), each the caller's child.
    first_run, second_run = named(spans, "run traced")
    assert parent_id(first_run) == parent_id(second_run) == caller_context.span_id
    assert first_run.attributes is not None
    assert second_run.attributes is not None
    assert first_run.attributes["workflowd.workflow.id"] == str(traced.id)
    assert first_run.attributes["workflowd.workflow.type"] == "traced"
    assert first_run.attributes["workflowd.outcome"] == "retry_scheduled"
    assert second_run.attributes["workflowd.outcome"] == "completed"
    assert first_run.status.status_code == second_run.status.status_code == StatusCode.UNSET

    # Its attempts: the failed one under the first run, with its exception; the retry
    # and the next step under the second.
    failed, retried = named(spans, "step flaky")
    assert parent_id(failed) == span_id(first_run)
    assert parent_id(retried) == span_id(second_run)
    assert failed.attributes is not None
    assert retried.attributes is not None
    assert {key: failed.attributes[key] for key in ("workflowd.step.name", "workflowd.step.attempt")} == {
        "workflowd.step.name": "flaky", "workflowd.step.attempt": 1,
    }  # fmt: skip
    assert failed.attributes["workflowd.workflow.id"] == str(traced.id)
    assert failed.attributes["workflowd.outcome"] == "failed"
    assert failed.status.status_code == StatusCode.ERROR
    assert exception_of(failed)["exception.type"] == "RuntimeError"
    assert exception_of(failed)["exception.message"] == "first attempts fail"
    assert "raise RuntimeError" in str(exception_of(failed)["exception.stacktrace"])
    assert (retried.attributes["workflowd.step.attempt"], retried.attributes["workflowd.outcome"]) == (
        2, "succeeded",
    )  # fmt: skip
    assert retried.status.status_code == StatusCode.UNSET

    # The plain function's own span nests under its attempt, in the step's thread.
    (threaded,) = named(spans, "step threaded")
    (user_work,) = named(spans, "user work")
    assert parent_id(threaded) == span_id(second_run)
    assert parent_id(user_work) == span_id(threaded)

    # The failing workflow: its run failed, its attempt recorded the PermanentError.
    (doomed_run,) = named(spans, "run doomed")
    (charge,) = named(spans, "step charge")
    assert parent_id(doomed_run) == caller_context.span_id
    assert parent_id(charge) == span_id(doomed_run)
    assert doomed_run.attributes is not None
    assert charge.attributes is not None
    assert doomed_run.attributes["workflowd.outcome"] == "failed"
    assert doomed_run.status.status_code == StatusCode.ERROR
    assert charge.attributes["workflowd.outcome"] == "failed"
    assert exception_of(charge)["exception.type"] == "PermanentError"
    assert charge.status.description == "PermanentError: card declined"

    # A duplicate start keeps the first start's trace context.
    with provider.get_tracer("caller").start_as_current_span("another caller"):
        again = await service.start("traced", {"n": 1}, "u1")
    assert not again.created
    assert db.execute("SELECT traceparent FROM workflows WHERE id = %s", (traced.id,)).fetchone() == (stored,)


async def test_a_sql_insert_sets_the_trace_or_gets_one_per_workflow(
    provider: TracerProvider, exporter: InMemorySpanExporter, pool: AsyncConnectionPool, db_url: str,
    service: WorkflowService, db: psycopg.Connection[Any],
) -> None:  # fmt: skip
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    by_hand = insert_workflow(db, type="traced", traceparent=given)["id"]
    untraced = insert_workflow(db, type="traced")["id"]
    garbage = insert_workflow(db, type="doomed", traceparent="not a traceparent")["id"]
    unsampled = insert_workflow(db, type="traced", traceparent=given.removesuffix("01") + "00")["id"]
    ids = [by_hand, untraced, garbage, unsampled]
    await drive_until_finished(pool, db_url, service, ids, Tracing(provider))
    runs = named(exporter.get_finished_spans(), "run traced")

    def runs_of(workflow_id: UUID) -> list[ReadableSpan]:
        return [run for run in runs if (run.attributes or {})["workflowd.workflow.id"] == str(workflow_id)]

    # The hand-written context is the parent of both runs (the first one's retry included).
    assert [(trace_id(run), parent_id(run)) for run in runs_of(by_hand)] == [
        (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    ] * 2
    # None stored: each run is a root, and all runs share the trace the workflow's id gives.
    assert [(trace_id(run), parent_id(run)) for run in runs_of(untraced)] == [
        (workflow_trace_id(untraced), None)
    ] * 2
    # A starter that did not sample its trace: nor do the runs (the parent decides).
    assert runs_of(unsampled) == []
    # A value that is not a traceparent is no parent: a root, as if none were stored.
    (doomed_run,) = named(exporter.get_finished_spans(), "run doomed")
    assert (trace_id(doomed_run), parent_id(doomed_run)) == (workflow_trace_id(garbage), None)


async def test_a_workflow_refused_at_its_claim_gets_a_run_span_that_says_why(
    provider: TracerProvider, exporter: InMemorySpanExporter, pool: AsyncConnectionPool, db_url: str,
    service: WorkflowService, db: psycopg.Connection[Any],
) -> None:  # fmt: skip
    # Beyond the definition's last step: refused by the claim, never driven.
    refused = insert_workflow(db, type="doomed", current_step_index=5)["id"]
    await drive_until_finished(pool, db_url, service, [refused], Tracing(provider))
    (run,) = named(exporter.get_finished_spans(), "run doomed")
    assert run.attributes is not None
    assert run.attributes["workflowd.outcome"] == "refused"
    assert run.status.status_code == StatusCode.ERROR
    assert exception_of(run)["exception.type"] == "DefinitionMismatch"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
    ],
    ids=["unset", "exporter-none", "sdk-disabled"],
)
async def test_without_otel_variables_nothing_is_installed_and_no_span_is_made(
    environ: dict[str, str], pool: AsyncConnectionPool, db_url: str, service: WorkflowService,
    db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    assert start_tracing(environ) is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    # No span is made, and no context is so much as attached, however many steps run
    # (every span the API makes current goes through context.attach).
    attached: list[object] = []
    real_attach = context_api.attach

    def counting_attach(context: context_api.Context) -> object:
        attached.append(context)
        return real_attach(context)

    monkeypatch.setattr(context_api, "attach", counting_attach)
    service.registry = REGISTRY
    started = (await service.start("traced", {"n": 3}, "u1")).workflow
    await drive_until_finished(pool, db_url, service, [started.id], tracing=None)
    assert attached == []
    assert db.execute("SELECT traceparent FROM workflows WHERE id = %s", (started.id,)).fetchone() == (None,)
