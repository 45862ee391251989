"""OpenTelemetry traces: whether the daemon traces, and the spans it makes.

Tracing is on when the standard variables ask for it (`tracing_config` is the one
rule): OTEL_TRACES_EXPORTER names an exporter other than `none`, or, with it unset,
OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; and
OTEL_SDK_DISABLED is not true. Unlike the SDK's own default (OTLP whenever nothing is
set), nothing set means off: a daemon nobody configured for tracing makes no span,
copies no context and exports nothing; the driver checks one attribute per step.

On, the daemon installs an SDK TracerProvider with a BatchSpanProcessor per exporter
(`otlp`, OTLP over HTTP/protobuf, the default; `console`, one JSON line a span on
stderr), and the SDK reads the rest of the standard variables itself: the endpoint,
headers and timeout of the exporter (OTEL_EXPORTER_OTLP_*), the sampler
(OTEL_TRACES_SAMPLER), the batching (OTEL_BSP_*), the resource (OTEL_RESOURCE_ATTRIBUTES,
OTEL_SERVICE_NAME; service.name is `workflowd` unless they name another).

The spans (docs/architecture.md, "Traces"):

- `run <type>`: one run of a workflow on a daemon, from its claim to the release of
  its lease (Driver.drive), a child of the trace context its starter stored on the row
  (engine/traceparent.py); every run, retry and daemon joins the starter's trace. A
  workflow started untraced has each run as a root span, in a trace whose id is derived
  from the workflow's id: its runs still share one trace, and nothing is written to
  keep it. A workflow refused or cancelled at its claim gets a run span that ends there.
- `step <name>` / `compensate <name>`: one attempt, a child of its run, from the start
  of the step's code to the commit of its outcome; current while the step runs, in a
  plain function's thread too, so that the step's own spans nest under it.
- `POST /admin/workflows` and the other admin requests: FastAPI's own server span,
  continuing the request's `traceparent` header (health and metrics requests make
  none); a workflow started in it stores the context of the span current in its route.

Attributes carry the `workflowd.` prefix; a failed attempt records its exception (type,
message, traceback) and has status ERROR.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, ParamSpec, TypeVar
from uuid import UUID

import structlog
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.typing import EventDict, WrappedLogger

from daemon.http_guard import is_admin_path
from daemon.settings import ConfigurationError
from engine.attempts import ClaimedWorkflow
from engine.runner import StepFailed, StepOutcome
from engine.traceparent import parent_context

LOG = structlog.get_logger("workflowd.tracing")
P = ParamSpec("P")
T = TypeVar("T")

SERVICE_NAME_DEFAULT = "workflowd"
# How long shutdown waits for the last spans to be exported.
FLUSH_SECONDS_DEFAULT = 5.0
SDK_WARNING_INTERVAL_SECONDS = 60.0
TRACER_NAME = "workflowd"
Exporter = Literal["otlp", "console"]
EXPORTERS: tuple[Exporter, ...] = ("otlp", "console")
OTLP_PROTOCOL = "http/protobuf"

# Span attributes.
WORKFLOW_ID = "workflowd.workflow.id"
WORKFLOW_TYPE = "workflowd.workflow.type"
WORKFLOW_VERSION = "workflowd.workflow.version"
WORKER_ID = "workflowd.worker.id"
COMPENSATING = "workflowd.compensating"
STEP_NAME = "workflowd.step.name"
STEP_ATTEMPT = "workflowd.step.attempt"
OUTCOME = "workflowd.outcome"
ERROR_TYPE = "error.type"
# The outcomes of a run that mean its workflow (or its undoing) failed.
FAILED_RUN_OUTCOMES = frozenset({"failed", "compensation_failed", "crashed", "refused"})


@dataclass(frozen=True)
class TracingConfig:
    """What the OTEL_* variables ask of this daemon, read once at start."""

    exporters: tuple[Exporter, ...]


def tracing_config(environ: Mapping[str, str]) -> TracingConfig | None:
    """The one rule of when the daemon traces (see the module's docstring); None: off.
    Raises ConfigurationError for an exporter or an OTLP protocol it cannot serve."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    named = [name for name in named if name]
    if not named:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        named = ["otlp"] if any(environ.get(name, "").strip() for name in endpoints) else []
    exporters = tuple(_exporter(name) for name in dict.fromkeys(named) if name != "none")
    if not exporters:
        return None
    if "otlp" in exporters:
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or OTLP_PROTOCOL
        )
        if protocol.strip() != OTLP_PROTOCOL:
            raise ConfigurationError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: workflowd exports traces over OTLP {OTLP_PROTOCOL} only, "
                f"not {protocol!r} (a collector's port 4318)"
            )
    return TracingConfig(exporters)


def _exporter(name: str) -> Exporter:
    for known in EXPORTERS:
        if name == known:
            return known
    raise ConfigurationError(
        f"OTEL_TRACES_EXPORTER: workflowd has no trace exporter {name!r} (it has: otlp, console, none)"
    )


def start_tracing(environ: Mapping[str, str]) -> Tracing | None:
    """Install the TracerProvider the OTEL_* variables ask for, as the process's global
    one; None, and nothing installed, when they ask for none."""
    config = tracing_config(environ)
    if config is None:
        return None
    _quiet_sdk_warnings()
    provider = tracer_provider(*(BatchSpanProcessor(_make_exporter(name)) for name in config.exporters))
    trace.set_tracer_provider(provider)
    return Tracing(provider)


class OncePerInterval(logging.Filter):
    """Lets each message of the SDK's through once every `seconds` at most."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.msg), time.monotonic()
        if now - self.last.get(key, -self.seconds) < self.seconds:
            return False
        self.last[key] = now
        return True


def _quiet_sdk_warnings() -> None:
    """The SDK's own warnings on stderr, each at most once a minute: with its collector
    down, it warns of every span it drops (thousands a second), which would cost more
    than the spans."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OncePerInterval(SDK_WARNING_INTERVAL_SECONDS))
    sdk = logging.getLogger("opentelemetry")
    sdk.addHandler(handler)
    sdk.propagate = False


def _make_exporter(name: Exporter) -> SpanExporter:
    if name == "console":
        # On stderr, a line a span: stdout is the log's, a JSON line an event.
        return ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    # Imported only when asked for: the OTLP exporter brings an HTTP client with it.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


def tracer_provider(*processors: SpanProcessor) -> TracerProvider:
    """An SDK TracerProvider for the daemon's spans, its resource from the environment
    (service.name `workflowd` unless it says otherwise), its sampler from
    OTEL_TRACES_SAMPLER, and the trace ids of untraced workflows (see _RunTraceIds)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE_NAME_DEFAULT}))
    if SERVICE_VERSION not in resource.attributes:
        resource = resource.merge(Resource({SERVICE_VERSION: _version()}))
    provider = TracerProvider(resource=resource, id_generator=_RunTraceIds())
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _version() -> str:
    try:
        return metadata.version("stellara-workflows")
    except metadata.PackageNotFoundError:
        return "unknown"


# The trace id the next root span takes: set by Tracing.run around the start of the run
# span of a workflow with no stored trace context.
_RUN_TRACE_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "workflowd_run_trace_id", default=None
)


class _RunTraceIds(RandomIdGenerator):
    """Random ids, except for the run span of a workflow started untraced: its trace id
    is derived from the workflow's id, so that all its runs share one trace."""

    def generate_trace_id(self) -> int:
        derived = _RUN_TRACE_ID.get()
        return derived if derived is not None else super().generate_trace_id()


def workflow_trace_id(workflow_id: UUID) -> int:
    """The trace id of the runs of an untraced workflow. A hash of its id, not the id
    itself: a ratio sampler reads a trace id's bits as random, and a workflow id's are
    not (the first 48 of a time-ordered id are its time; the version and variant bits
    of any UUID are fixed)."""
    digest = hashlib.blake2b(workflow_id.bytes, digest_size=16, person=b"workflowd-trace").digest()
    return int.from_bytes(digest, "big") or 1


class Tracing:
    """The daemon's tracer, and the spans of runs, attempts and admin requests.

    Built from a TracerProvider (`start_tracing`'s, or a test's); a daemon without
    tracing has no Tracing at all, and the driver then does no tracing work.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME, _version())

    def shutdown(self, timeout_seconds: float = FLUSH_SECONDS_DEFAULT) -> bool:
        """Export the spans still queued and stop the exporters, waiting at most
        `timeout_seconds` (a collector that does not answer must not hold up a stop:
        its spans are then lost, and a line says so); whether it finished in time."""
        flushing = threading.Thread(target=self.provider.shutdown, name="trace-flush", daemon=True)
        flushing.start()
        flushing.join(timeout_seconds)
        if flushing.is_alive():
            LOG.warning("traces_not_flushed", waited_seconds=timeout_seconds)
            return False
        return True

    # Runs and attempts (daemon/driver.py).

    @contextmanager
    def run(self, claimed: ClaimedWorkflow, *, worker_id: str) -> Iterator[Span]:
        """The span of one run of a claimed workflow, current inside the block."""
        with trace.use_span(self._run_span(claimed, worker_id), end_on_exit=True) as span:
            yield span

    @staticmethod
    def run_ended(span: Span, outcome: str) -> None:
        """What the run came to: `completed`, `retry_scheduled`, `lease_lost` ..."""
        span.set_attribute(OUTCOME, outcome)
        if outcome in FAILED_RUN_OUTCOMES:
            span.set_status(Status(StatusCode.ERROR, outcome))

    def claim_settled(self, claimed: ClaimedWorkflow, *, worker_id: str, failed: StepFailed | None) -> None:
        """The run of a workflow its claim settled at once: refused (`failed`), or
        cancelled at a step boundary."""
        span = self._run_span(claimed, worker_id)
        if failed is not None:
            _record_failure(span, failed)
        self.run_ended(span, "cancelled" if failed is None else "refused")
        span.end()

    def _run_span(self, claimed: ClaimedWorkflow, worker_id: str) -> Span:
        attributes: dict[str, AttributeValue] = {
            WORKFLOW_ID: str(claimed.id), WORKFLOW_TYPE: claimed.type, WORKER_ID: worker_id,
            COMPENSATING: claimed.compensating,
        }  # fmt: skip
        if claimed.version is not None:
            attributes[WORKFLOW_VERSION] = claimed.version
        parent = parent_context(claimed.traceparent)
        if parent is not None:
            return self.tracer.start_span(f"run {claimed.type}", parent, attributes=attributes)
        token = _RUN_TRACE_ID.set(workflow_trace_id(claimed.id))
        try:
            # An empty context: a root span, never the child of whatever is current.
            return self.tracer.start_span(f"run {claimed.type}", context_api.Context(), attributes=attributes)
        finally:
            _RUN_TRACE_ID.reset(token)

    @contextmanager
    def attempt(
        self, *, workflow_id: UUID, type: str, step: str, attempt: int, compensating: bool
    ) -> Iterator[Span]:
        """The span of one attempt of a step (or of its compensation: the span's name
        says which), a child of the current run span and current inside the block; an
        exception that escapes it is recorded. (Few attributes: each costs on every
        attempt, and its run has the rest.)"""
        span = self.tracer.start_span(
            f"{'compensate' if compensating else 'step'} {step}",
            attributes={
                WORKFLOW_ID: str(workflow_id),
                WORKFLOW_TYPE: type,
                STEP_NAME: step,
                STEP_ATTEMPT: attempt,
            },
        )
        with trace.use_span(span, end_on_exit=True):
            yield span

    @staticmethod
    def attempt_ended(result: str, outcome: StepOutcome | None = None) -> None:
        """The outcome of the current attempt (`succeeded`, `failed`, `snoozed`,
        `compensated` ...); a failure's exception is recorded."""
        span = trace.get_current_span()
        span.set_attribute(OUTCOME, result)
        if isinstance(outcome, StepFailed):
            _record_failure(span, outcome)


def _record_failure(span: Span, failed: StepFailed) -> None:
    """A failed attempt's exception, as record_exception writes one (the exception
    itself was caught by engine.runner, which keeps its summary and traceback)."""
    error_type, message = str(failed.error.get("type", "")), str(failed.error.get("message", ""))
    event = {"exception.type": error_type, "exception.message": message}
    if failed.traceback:
        event["exception.stacktrace"] = failed.traceback
    span.add_event("exception", event)
    span.set_attribute(ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


class ContextCopyingExecutor(Executor):
    """A thread pool whose every task runs in a copy of the submitter's context (what
    asyncio.to_thread does, and run_in_executor does not): a plain step function sees
    its attempt's span as current. Used only while tracing is on."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        run: Callable[..., T] = contextvars.copy_context().run
        return self.inner.submit(run, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait, cancel_futures=cancel_futures)


# Logs.


def add_trace_ids(logger: WrappedLogger, method_name: str, event: EventDict) -> EventDict:
    """A structlog processor: the current span's trace_id and span_id (hex, as tracing
    backends show them) on every line logged while one is current. Installed only when
    tracing is on (daemon/logs.py)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event["trace_id"] = trace.format_trace_id(span_context.trace_id)
        event["span_id"] = trace.format_span_id(span_context.span_id)
    return event


# HTTP.


def untraced_request(scope: MutableMapping[str, Any]) -> bool:
    """FastAPI's `telemetry.exclude`: health and metrics requests make no span (probes
    and scrapers would fill a trace store with them); admin requests do."""
    return not is_admin_path(str(scope.get("path", "")))


class RequestTraceContext:
    """ASGI middleware: an admin request's `traceparent` header is the trace a workflow
    it starts continues.

    With tracing on, FastAPI (0.142 and later) makes each admin request a server span
    continuing the header, current while the route runs: this middleware then finds a
    valid span and does nothing. Without it (tracing off, or an older FastAPI) the
    header's context alone is made current, so that a start still stores the caller's
    trace context, and its runs, on the daemons that trace, continue it: one header
    lookup a request, no span.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not is_admin_path(scope["path"])
            or trace.get_current_span().get_span_context().is_valid
        ):
            await self.app(scope, receive, send)
            return
        token = context_api.attach(propagate.extract(Headers(scope=scope)))
        try:
            await self.app(scope, receive, send)
        finally:
            context_api.detach(token)
