"""The benchmark suite: `python -m bench` (or `make bench`).

Starts its own PostgreSQL (fsync and synchronous_commit on), runs each case `--repeats`
times, prints a table of medians with their spread (min-max), every throughput also as
a share of the database's own limit, and writes the figures to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import cases
from bench.daemon import pickup_latency, throughput
from daemon.local_postgres import LocalPostgres


def repeat(times: int, run: Callable[[], dict[str, float]], key: str) -> dict[str, Any]:
    """Median and spread of `key` over `times` runs of `run`."""
    values = [run()[key] for _ in range(times)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workflows", type=int, default=20_000, help="workflows per throughput run")
    parser.add_argument("--processes", default="1,2,4", help="daemon processes to try, comma-separated")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inserts", type=int, default=500, help="single inserts for the pickup latency")
    parser.add_argument(
        "--claim-cost", action="store_true", help="also time the claim beside 1,000,000 finished rows"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}"
    }
    with LocalPostgres.temporary() as cluster:
        with psycopg.connect(cluster.url()) as conn:
            results["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        limit = repeat(args.repeats, lambda: cases.sql_limit(cluster), "rows_per_s")
        results["sql_limit_rows_per_s"] = limit
        rows = [("plain-SQL limit, rows/s", limit, None)]
        for steps in (1, 3):
            for processes in (int(p) for p in args.processes.split(",")):

                def run(processes: int = processes, steps: int = steps) -> dict[str, float]:
                    return throughput(cluster, processes, args.workflows, args.concurrency, steps)

                figure = repeat(args.repeats, run, "steps_per_s")
                results[f"steps_per_s_{steps}_step_{processes}_processes"] = figure
                rows.append(
                    (f"{steps}-step workflows, {processes} process(es), steps/s", figure, limit["median"])
                )
        for quantile in ("p50_ms", "p95_ms", "p99_ms"):
            figure = repeat(
                args.repeats, lambda: pickup_latency(cluster, args.inserts, args.concurrency), quantile
            )
            results[f"pickup_{quantile}"] = figure
            rows.append((f"pickup latency {quantile}", figure, None))
        results["memory"] = cases.resident_memory(cluster, concurrency=100)
        if args.claim_cost:
            results["claim_cost"] = cases.claim_cost(cluster)
    print(f"{results['machine']}; PostgreSQL {results['postgres']}, fsync on; {args.repeats} runs a case\n")
    print(f"{'case':<48} {'median':>10} {'spread':>21} {'of SQL limit':>13}")
    for name, figure, against in rows:
        share = f"{100 * figure['median'] / against:.0f} %" if against else ""
        print(
            f"{name:<48} {figure['median']:>10,.1f} {figure['min']:>10,.1f}-{figure['max']:<10,.1f} {share:>13}"
        )
    print(f"\nresident memory at concurrency 100: {results['memory']['peak_rss_mb']} MB")
    if "claim_cost" in results:
        print(f"claim cost: {results['claim_cost']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
