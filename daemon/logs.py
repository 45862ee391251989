"""Logging: structlog, JSON lines on stdout (a readable console renderer on a terminal).

Every line has a stable `event` name; the worker binds workflow_id, type, step, attempt
and worker to the lines about a workflow. With tracing on, a line logged while a span is
current carries its trace_id and span_id (daemon/tracing.py).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

from daemon.tracing import add_trace_ids

LogFormat = Literal["auto", "json", "console"]


def configure_logging(
    log_format: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    trace_ids: bool = False,
) -> None:
    """Route structlog to stdout (or `stream`), as JSON lines or for a human at a terminal.
    `trace_ids`: add the current span's ids to each line (only when tracing is on: the
    lookup is not free, and without tracing there is never a span)."""
    stream = stream or sys.stdout
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    tracing: list[structlog.types.Processor] = [add_trace_ids] if trace_ids else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *tracing,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
