"""The W3C trace context a workflow carries from its start to every run of it.

A start made while a span is current (the HTTP request's, or the caller's own around
`WorkflowService.start`) stores that span's `traceparent` on the workflow row
(`workflows.traceparent`, migration 0020); every run of the workflow, on any daemon and
after any number of retries, continues that trace (daemon/tracing.py). A SQL insert may
write the column by hand. Only the OpenTelemetry API is used here, never the SDK: with
no tracing configured in the process there is no valid current span, and nothing is
stored.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
_W3C = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The `traceparent` of the current span; None when no valid span is current."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get(TRACEPARENT)


def parent_context(traceparent: str | None) -> Context | None:
    """The context whose (remote) span a run's span is the child of; None when there is
    no stored traceparent or it is not a valid one (a SQL insert may write anything:
    a bad value costs its workflow the link to its starter, nothing else)."""
    if not traceparent:
        return None
    context = _W3C.extract({TRACEPARENT: traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None
