"""What tracing costs: the one-step drain with tracing on, its spans exported over
OTLP/HTTP to a sink on loopback that decodes and discards them, beside the same drain
with tracing off and with one trace in ten sampled, in turn.

Part of `python -m bench`; on its own, `python -m bench.tracing [--rounds 3]` starts a
cluster of its own and runs only this case. The drains are `bench.daemon.throughput`
(workflows inserted by SQL, so no stored trace context: each run is a root span in its
workflow's trace; two spans a workflow, the run and its one attempt). The sink counts
the spans it received, so that a span the daemons dropped (a full export queue) shows
as missing instead of as a cheaper drain. The daemons flush at shutdown, after the
drain's clock (the database's, first claim to last completion) has stopped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.daemon import throughput
from daemon.local_postgres import LocalPostgres

PROCESSES = 2
# The spans of a one-step workflow: its run and its attempt.
SPANS_PER_WORKFLOW = 2
SAMPLED_RATIO = 0.1
CASES = ("off", "on", "sampled")


@dataclass
class Sink:
    """What the sink received."""

    spans: int = 0
    requests: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def otlp_receiver(on_export: Callable[[ExportTraceServiceRequest, int], None]) -> Iterator[str]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (POST /v1/traces, protobuf, gzip or
    not): its endpoint (for OTEL_EXPORTER_OTLP_ENDPOINT). Each export request, with its
    size on the wire, goes to `on_export` (from the server's threads)."""
    answer = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            sent = len(body)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            on_export(ExportTraceServiceRequest.FromString(body), sent)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def otlp_sink() -> Iterator[tuple[str, Sink]]:
    """An OTLP/HTTP trace receiver that counts what it is sent and keeps nothing: its
    endpoint, and its counts."""
    sink = Sink()

    def count(request: ExportTraceServiceRequest, size: int) -> None:
        spans = sum(len(scope.spans) for each in request.resource_spans for scope in each.scope_spans)
        with sink.lock:
            sink.spans += spans
            sink.requests += 1
            sink.bytes += size

    with otlp_receiver(count) as endpoint:
        yield endpoint, sink


def traced_drain(
    cluster: LocalPostgres, workflows: int, concurrency: int, *, ratio: float | None = None
) -> dict[str, Any]:
    """The one-step drain of PROCESSES daemons with tracing on (OTLP/HTTP to the sink,
    the SDK's defaults otherwise: batches of 512, every trace sampled unless `ratio`
    says which share is); with what the sink received."""
    with otlp_sink() as (endpoint, sink):
        settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "workflowd-bench"}
        if ratio is not None:
            settings |= {
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(ratio),
            }
        result = throughput(cluster, PROCESSES, workflows, concurrency, 1, settings=settings)
    return result | {
        "spans_received": sink.spans,
        "spans_expected": round(SPANS_PER_WORKFLOW * workflows * (ratio or 1)),
        "export_requests": sink.requests,
        "export_bytes_per_span": round(sink.bytes / max(sink.spans, 1), 1),
    }


def cost(cluster: LocalPostgres, workflows: int, concurrency: int, *, round_: int = 0) -> dict[str, Any]:
    """One round: the drain with tracing off, on, and on with SAMPLED_RATIO of the traces
    sampled, in turn (the order turns with `round_`: the machine's speed drifts)."""
    drains = {}
    for case in CASES[round_ % 3 :] + CASES[: round_ % 3]:
        if case == "off":
            drains[case] = throughput(cluster, PROCESSES, workflows, concurrency, 1)
        else:
            ratio = SAMPLED_RATIO if case == "sampled" else None
            drains[case] = traced_drain(cluster, workflows, concurrency, ratio=ratio)
    off = drains["off"]["steps_per_s"]
    return {
        **drains,
        "on_over_off": round(drains["on"]["steps_per_s"] / off, 3),
        "sampled_over_off": round(drains["sampled"]["steps_per_s"] / off, 3),
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds: throughput and daemon CPU a workflow of each case, the
    ratios, and the share of the fully sampled drains' spans that arrived."""

    def median(case: str, key: str) -> float:
        return statistics.median(float(each[case][key]) for each in rounds)

    return {
        "rounds": len(rounds),
        **{f"{case}_workflows_per_s": median(case, "workflows_per_s") for case in CASES},
        "on_over_off": statistics.median(each["on_over_off"] for each in rounds),
        "sampled_over_off": statistics.median(each["sampled_over_off"] for each in rounds),
        "sampled_ratio": SAMPLED_RATIO,
        **{
            f"{case}_daemon_cpu_ms_per_workflow": median(case, "daemon_cpu_ms_per_workflow") for case in CASES
        },
        "spans_received_share": round(
            sum(each["on"]["spans_received"] for each in rounds)
            / sum(each["on"]["spans_expected"] for each in rounds),
            4,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a drain of each case")
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    rounds = []
    with LocalPostgres.temporary() as cluster:
        for round_ in range(args.rounds):
            result = cost(cluster, args.workflows, args.concurrency, round_=round_)
            rounds.append(result)
            drains = ", ".join(
                f"{case} {result[case]['workflows_per_s']:,} wf/s "
                f"({result[case]['daemon_cpu_ms_per_workflow']} daemon CPU ms/wf)"
                for case in CASES
            )
            print(
                f"round {round_}: {drains}; on/off {result['on_over_off']}, sampled/off "
                f"{result['sampled_over_off']}; spans {result['on']['spans_received']:,} of "
                f"{result['on']['spans_expected']:,}",
                flush=True,
            )
    print(json.dumps(summary(rounds), indent=2))


if __name__ == "__main__":
    main()
