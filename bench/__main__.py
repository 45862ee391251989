"""The benchmark suite: `python -m bench` (or `make bench`).

Starts its own PostgreSQL (fsync and synchronous_commit on), runs each case `--repeats`
times, prints a table of medians with their spread (min-max), every throughput also as
a share of the database's own limit, and writes the figures to a JSON file. The peers
(PgQueuer, Procrastinate, DBOS Transact) run on the same cluster in the same run, from a
virtualenv of their own (bench/.venv-peers), never from the project's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import cases, flow, peers, relay, retention, tracing
from bench.daemon import burst_after_idle, pickup_latency, throughput
from bench.flows import noop_1
from bench.limited_flows import noop_fair, noop_limited
from daemon.local_postgres import LocalPostgres


@dataclass
class Report:
    """The figures of one run: rows of the printed table, and the JSON document."""

    repeats: int
    rows: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def measure(
        self, key: str, label: str, run: Callable[[], dict[str, Any]], metric: str, unit: str
    ) -> float:
        """Run a case `repeats` times; record the median and spread of `metric`."""
        return self.record(key, label, [run() for _ in range(self.repeats)], metric, unit)

    def record(self, key: str, label: str, runs: list[dict[str, Any]], metric: str, unit: str) -> float:
        """Record the median and spread of `metric` over the results of a case's runs."""
        values = [float(result[metric]) for result in runs]
        figure = {
            "median": statistics.median(values), "min": min(values), "max": max(values),
            "unit": unit, "runs": runs,
        }  # fmt: skip
        self.figures[key] = figure
        self.rows.append((label, figure, unit))
        # As it goes: a run stopped half way still tells what it measured.
        print(f"measured: {label}: {figure['median']:,.1f} {unit}", flush=True)
        return figure["median"]

    def keep(self, key: str, value: Any) -> None:
        """Keep a figure that is not a case's median (printed as it comes, as `record`'s)."""
        self.figures[key] = value
        print(f"measured: {key}: {json.dumps(value)}", flush=True)

    def print(self, limit: float) -> None:
        print(f"{'case':<56} {'median':>9} {'spread (min-max)':>19} {'unit':<10} {'of SQL limit':>12}")
        for label, figure, unit in self.rows:
            share = f"{100 * figure['median'] / limit:.1f} %" if unit.endswith("/s") else ""
            spread = f"{figure['min']:,.1f}-{figure['max']:,.1f}"
            print(f"{label:<56} {figure['median']:>9,.1f} {spread:>19} {unit:<10} {share:>12}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workflows", type=int, default=20_000, help="workflows (and peer jobs) per run")
    parser.add_argument("--processes", default="1,2,4", help="daemon processes to try, comma-separated")
    parser.add_argument("--concurrency", type=int, default=100, help="WORKFLOWD_CONCURRENCY of each daemon")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inserts", type=int, default=500, help="single inserts for the pickup latency")
    parser.add_argument("--dbos-workflows", type=int, default=2_000, help="DBOS is slow: fewer workflows")
    parser.add_argument(
        "--finished",
        type=int,
        default=1_000_000,
        help="finished workflows for the claim cost and the large tables",
    )
    parser.add_argument(
        "--due", type=int, default=100_000, help="due workflows drained beside the finished ones"
    )
    parser.add_argument(
        "--pruned", type=int, default=1_000_000, help="finished workflows pruned beside idle daemons"
    )
    parser.add_argument(
        "--stats-rows", type=int, default=10_000_000, help="workflows in the table the stats call reads"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip PgQueuer, Procrastinate and DBOS")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    return parser.parse_args()


def main() -> None:
    args = arguments()
    counts = [int(count) for count in args.processes.split(",")]
    report = Report(args.repeats)
    with LocalPostgres.temporary() as cluster:
        with psycopg.connect(cluster.url()) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        report.figures["machine"] = (
            f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"PostgreSQL {version} (fsync and synchronous_commit on)"
        )
        limit = report.measure(
            "sql_limit", "plain-SQL limit (claim SKIP LOCKED, complete batches)",
            lambda: cases.sql_limit(cluster, args.workflows), "rows_per_s", "rows/s",
        )  # fmt: skip
        for steps in (1, 3):
            for processes in counts:
                report.measure(
                    f"workflowd_{steps}_step_{processes}_processes",
                    f"workflowd {steps}-step workflows, {processes} process(es)",
                    lambda processes=processes, steps=steps: throughput(  # type: ignore[misc]
                        cluster, processes, args.workflows, args.concurrency, steps
                    ),
                    "steps_per_s", "steps/s",
                )  # fmt: skip
        report.measure(
            "workflowd_1_step_plain_2_processes", "workflowd 1-step workflows, plain (sync) steps, 2 processes",
            lambda: throughput(cluster, 2, args.workflows, args.concurrency, 1, plain=True),
            "steps_per_s", "steps/s",
        )  # fmt: skip
        measure_flow_control(report, cluster, args)
        measure_tracing(report, cluster, args)
        if not args.no_peers:
            measure_peers(report, cluster, counts, args)
        measure_latency(report, cluster, args)
        if not args.no_peers:
            measure_peer_latency(report, cluster, args)
        measure_burst(report, cluster, args)
        large = cases.large_tables(cluster, args.finished, args.due, args.concurrency)
        report.record(
            "large_tables_empty", f"workflowd 1-step, 2 processes, {args.due:,} due into empty tables",
            [large], "empty_workflows_per_s", "workflows/s",
        )  # fmt: skip
        report.record(
            "large_tables", f"workflowd 1-step, 2 processes, {args.due:,} due beside {args.finished:,} finished",
            [large], "workflows_per_s", "workflows/s",
        )  # fmt: skip
        report.keep("large_over_empty", large["large_over_empty"])
        report.keep("claim_cost", cases.claim_cost(cluster, args.finished))
        report.keep("memory", cases.resident_memory(cluster, concurrency=100))
        report.keep("relay", relay.relay_drain(cluster, args.workflows, args.concurrency))
        steady_rate = max(100, min(500, args.workflows // 40))  # 500 a second in a full run
        report.keep("relay_steady", relay.relay_steady(cluster, steady_rate, 10, args.concurrency))
        report.keep("prune", retention.prune_under_load(cluster, args.pruned, args.concurrency))
        report.keep("stats", retention.stats_cost(cluster, args.stats_rows))
    print(f"{report.figures['machine']}; {args.repeats} runs a case\n")
    report.print(limit)
    print_primary_cost(report.figures)
    print_comparisons(report.figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.figures, indent=2))
    print(f"\nwritten to {args.out}")


def measure_flow_control(report: Report, cluster: LocalPostgres, args: argparse.Namespace) -> None:
    """Drains of an unlimited, a limited and a fair type by daemons that serve the
    limited types too, beside the unlimited 1-step drain above (daemons that serve none),
    and the claim of each kind of type."""
    for workflow, label in (
        (noop_1, "no limit, beside idle limited types"),
        (noop_limited, "a concurrency limit of 1,000 it never reaches"),
        (noop_fair, f"fair between {flow.FAIR_USERS} users"),
    ):
        report.measure(
            f"workflowd_1_step_{workflow.type}_2_processes", f"workflowd 1-step workflows, {label}, 2 processes",
            lambda workflow=workflow: flow.limited_drain(  # type: ignore[misc]
                cluster, args.workflows, args.concurrency, workflow
            ),
            "steps_per_s", "steps/s",
        )  # fmt: skip
    report.keep("flow_claims", flow.claim_costs(cluster))


def measure_tracing(report: Report, cluster: LocalPostgres, args: argparse.Namespace) -> None:
    """The 1-step drain of 2 processes with tracing on (OTLP/HTTP to a loopback sink),
    beside the same with it off and with a tenth of the traces sampled, in turn
    (bench/tracing.py)."""
    rounds = [
        tracing.cost(cluster, args.workflows, args.concurrency, round_=each) for each in range(args.repeats)
    ]
    for case, label in (
        ("off", "tracing off"),
        ("on", "traced, OTLP/HTTP to a loopback sink"),
        ("sampled", f"traced, {tracing.SAMPLED_RATIO:.0%} of traces sampled"),
    ):
        report.record(
            f"workflowd_1_step_tracing_{case}_2_processes", f"workflowd 1-step workflows, {label}, 2 processes",
            [each[case] for each in rounds], "steps_per_s", "steps/s",
        )  # fmt: skip
    report.keep("tracing", tracing.summary(rounds))


def measure_peers(
    report: Report, cluster: LocalPostgres, counts: list[int], args: argparse.Namespace
) -> None:
    for system in ("pgqueuer", "procrastinate"):
        for processes in counts:
            report.measure(
                f"{system}_{processes}_processes", f"{system} no-op jobs, {processes} process(es)",
                lambda system=system, processes=processes: peers.peer_throughput(  # type: ignore[misc]
                    cluster, system, processes, args.workflows
                ),
                "jobs_per_s", "jobs/s",
            )  # fmt: skip
    for steps in (1, 3):
        report.measure(
            f"dbos_{steps}_step_2_processes", f"DBOS Transact {steps}-step workflows, 2 processes",
            lambda steps=steps: peers.peer_throughput(  # type: ignore[misc]
                cluster, "dbos", 2, args.dbos_workflows, steps
            ),
            "steps_per_s", "steps/s",
        )  # fmt: skip


def measure_latency(report: Report, cluster: LocalPostgres, args: argparse.Namespace) -> None:
    # One set of runs, three quantiles read off each.
    runs = [pickup_latency(cluster, args.inserts, args.concurrency) for _ in range(args.repeats)]
    for quantile in ("p50_ms", "p95_ms", "p99_ms"):
        report.record(
            f"pickup_{quantile}", f"pickup latency {quantile[:3]}, idle daemons, NOTIFY", runs, quantile, "ms"
        )


def measure_peer_latency(report: Report, cluster: LocalPostgres, args: argparse.Namespace) -> None:
    runs = [peers.pgqueuer_pickup(cluster, args.inserts) for _ in range(args.repeats)]
    for quantile in ("p50_ms", "p95_ms", "p99_ms"):
        report.record(
            f"pgqueuer_pickup_{quantile}", f"pgqueuer pickup latency {quantile[:3]}, idle workers, NOTIFY",
            runs, quantile, "ms",
        )  # fmt: skip


def measure_burst(report: Report, cluster: LocalPostgres, args: argparse.Namespace) -> None:
    runs = [burst_after_idle(cluster, args.workflows, args.concurrency) for _ in range(args.repeats)]
    for case, label in (
        ("stale_statistics", "statistics of a nearly empty table"),
        ("analyzed", "tables analyzed"),
    ):
        report.record(
            f"burst_{case}",
            f"burst after idle, 2 processes, {label}",
            runs,
            f"{case}_workflows_per_s",
            "workflows/s",
        )
    report.figures["burst_stale_over_analyzed"] = statistics.median(
        run["stale_over_analyzed"] for run in runs
    )


# A burst drained with the statistics of a nearly empty table, at least this share of the
# rate with the tables analyzed.
BURST_TARGET = 0.8

COST_COLUMNS = (
    ("server_cpu_ms_per_workflow", "server CPU ms/wf"),
    ("workflows_per_server_core_second", "wf/server core-s"),
    ("wal_bytes_per_workflow", "WAL bytes/wf"),
    ("daemon_cpu_ms_per_workflow", "daemon CPU ms/wf"),
    ("daemon_connections_max", "daemon conns"),
)


def print_primary_cost(figures: dict[str, Any]) -> None:
    """What each drain cost the server and the daemons (medians of the runs), and what
    the busy backends waited on (docs/scaling.md reads these)."""
    print(f"\n{'what a drain cost (medians)':<40}" + "".join(f"{title:>18}" for _, title in COST_COLUMNS))
    for key, figure in figures.items():
        if not key.startswith("workflowd_"):
            continue
        runs = figure["runs"]
        cells = [statistics.median(float(run[name]) for run in runs) for name, _ in COST_COLUMNS]
        print(f"{key.removeprefix('workflowd_'):<40}" + "".join(f"{cell:>18,.2f}" for cell in cells))
        waits = runs[len(runs) // 2]["active_backends_waiting_on"]
        print(
            f"{'':<40}  active backends: " + ", ".join(f"{wait} {share} %" for wait, share in waits.items())
        )


def print_comparisons(figures: dict[str, Any]) -> None:
    """The issue's targets, as ratios of this run's own figures."""

    def median(key: str) -> float | None:
        return figures[key]["median"] if key in figures else None

    one_step, three_step = median("workflowd_1_step_2_processes"), median("workflowd_3_step_2_processes")
    pgqueuer, dbos = median("pgqueuer_2_processes"), median("dbos_3_step_2_processes")
    print()
    if one_step and pgqueuer:
        print(f"1-step workflows/s ÷ PgQueuer jobs/s, 2 processes: {one_step / pgqueuer:.2f}")
    if three_step and pgqueuer:
        print(f"3-step steps/s ÷ PgQueuer jobs/s, 2 processes: {three_step / pgqueuer:.2f}")
    if one_step and three_step:
        print(f"3-step steps/s ÷ 1-step workflows/s, 2 processes: {three_step / one_step:.2f}")
    pickup, peer_pickup = median("pickup_p50_ms"), median("pgqueuer_pickup_p50_ms")
    if pickup and peer_pickup:
        print(
            f"pickup p50, workflowd ÷ PgQueuer, idle, NOTIFY: {pickup:.2f} ÷ {peer_pickup:.2f} ms = {pickup / peer_pickup:.1f}"
        )
    plain = median("workflowd_1_step_plain_2_processes")
    if one_step and plain:
        print(
            f"1-step plain (sync) ÷ async steps, 2 processes: {plain / one_step:.2f} (target: at least 0.8)"
        )
    if "large_over_empty" in figures:
        print(
            f"1-step workflows/s beside large tables ÷ the same drain into empty ones, 2 processes: "
            f"{figures['large_over_empty']:.2f} (target: at least 0.85)"
        )
    if three_step and dbos:
        print(f"3-step steps/s ÷ DBOS 3-step steps/s, 2 processes: {three_step / dbos:.1f}")
    if "burst_stale_over_analyzed" in figures:
        ratio = figures["burst_stale_over_analyzed"]
        verdict = "within" if ratio >= BURST_TARGET else "NOT within"
        print(
            f"burst after idle, stale statistics ÷ analyzed: {ratio:.2f} ({verdict} 20 % of the analyzed case)"
        )
    claim = figures["claim_cost"]
    print(
        f"claim statement: {claim['empty_ms']} ms empty, {claim['with_finished_ms']} ms beside "
        f"{claim['finished_rows']:,} finished workflows ({claim['change_percent']:+} %)"
    )
    print(f"resident memory of one daemon at concurrency 100: {figures['memory']['peak_rss_mb']} MB peak")
    print_flow_control(figures)
    print_tracing(figures)
    print_time(figures)


def print_flow_control(figures: dict[str, Any]) -> None:
    """The claim of each kind of flow-controlled type against the unlimited claim, and
    their drains against the unlimited drain."""
    claims = figures["flow_claims"]
    print(
        f"claim of {claims['batch']} ({claims['due_per_type']:,} due of each type): "
        + ", ".join(
            f"{name} {ms} ms ({claims['over_unlimited'][name]}x)" for name, ms in claims["ms"].items()
        )
    )
    unlimited = figures.get("workflowd_1_step_2_processes")  # when --processes names 2
    for kind in ("noop_1", "noop_limited", "noop_fair"):
        drained = figures[f"workflowd_1_step_{kind}_2_processes"]["median"]
        ratio = f" ({drained / unlimited['median']:.2f}x unlimited)" if unlimited else ""
        print(f"1-step steps/s, {kind}, 2 processes: {drained:,.0f}{ratio}")


def print_tracing(figures: dict[str, Any]) -> None:
    """What tracing costs the 1-step drain, and whether every span arrived."""
    traced = figures["tracing"]
    print(
        f"1-step workflows/s, 2 processes, traced ÷ not: {traced['on_over_off']:.2f} "
        f"({traced['on_workflows_per_s']:,.0f} ÷ {traced['off_workflows_per_s']:,.0f}), "
        f"{traced['sampled_ratio']:.0%} sampled ÷ not: {traced['sampled_over_off']:.2f}; daemon CPU a workflow "
        f"{traced['on_daemon_cpu_ms_per_workflow']} / {traced['sampled_daemon_cpu_ms_per_workflow']} ms "
        f"against {traced['off_daemon_cpu_ms_per_workflow']} ms; "
        f"{100 * traced['spans_received_share']:.1f} % of the spans received"
    )


def print_time(figures: dict[str, Any]) -> None:
    """Retention and stats on large tables."""
    prune, stats = figures["prune"], figures["stats"]
    print(
        f"prune of {prune['finished']:,} finished workflows (with steps and timeline): {prune['prune_seconds']} s, "
        f"{prune['pruned_per_s']:,} workflows/s"
    )
    for label in ("idle", "pruning"):
        print(
            f"pickup latency of single inserts, 2 daemons, {label}: p50 {prune[f'{label}_p50_ms']} ms, "
            f"p99 {prune[f'{label}_p99_ms']} ms, max {prune[f'{label}_max_ms']} ms ({prune[f'{label}_pickups']} inserts)"
        )
    print(
        f"stats on {stats['rows']:,} workflows: {stats['stats_ms']} ms a call; the full count it replaced "
        f"{stats['full_count_ms']} ms; the recount one daemon makes a minute {stats['recount_ms']} ms"
    )


if __name__ == "__main__":
    main()
