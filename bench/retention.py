"""Time's cases: a prune of a million finished workflows beside idle daemons that keep
picking up single inserts (does retention stall the claim?), and the stats call on a
table of ten million workflows beside the full count it replaced."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from typing import Any

import psycopg

from bench.cases import seed_finished
from bench.daemon import daemons, fresh_database, wait_until_drained
from daemon.local_postgres import LocalPostgres
from engine import WorkflowService
from engine.counts import recount_finished
from engine.retention import RetentionPolicy, prune

PICKUP_GAP_SECONDS = 0.01
BASELINE_INSERTS = 500
STATS_SAMPLES = 20
# The stats query before engine/counts.py: every workflow read on every call.
FULL_COUNT = "SELECT type, state::text, count(*) FROM workflows GROUP BY type, state"
# The daemons must not prune on their own: the bench prunes, and times it. Nor take the
# retention lock (a daemon that keeps everything still prunes stale workers once a
# minute): the bench's prune would find it held, and stop there.
KEEP_FOR_EVER = {
    "WORKFLOWD_RETENTION_DAYS": "0",
    "WORKFLOWD_FAILED_RETENTION_DAYS": "0",
    "WORKFLOWD_RETENTION_INTERVAL": "86400",
}


def pickups(conn: psycopg.Connection[Any], label: str, until: threading.Event | int) -> dict[int, float]:
    """Single inserts of `pickup` workflows every 10 ms, `until` that many were made or
    the event is set; when each was committed, by its number."""
    committed: dict[int, float] = {}
    n = 0
    while not (until.is_set() if isinstance(until, threading.Event) else n >= until):
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) VALUES ('pickup', %s, 'bench')",
            (json.dumps({"label": label, "n": n}),),
        )
        committed[n] = time.time()
        n += 1
        time.sleep(PICKUP_GAP_SECONDS)
    return committed


def latency_ms(conn: psycopg.Connection[Any], label: str, committed: dict[int, float]) -> dict[str, float]:
    """Pickup latency quantiles (commit of the insert to the start of its step)."""
    wait_until_drained(conn)
    rows = conn.execute(
        "SELECT (input->>'n')::int, (output->>'started')::float8 FROM workflows "
        "WHERE type = 'pickup' AND input->>'label' = %s",
        (label,),
    ).fetchall()
    latencies = sorted((started - committed[n]) * 1000 for n, started in rows)
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        f"{label}_pickups": len(latencies),
        f"{label}_p50_ms": round(quantiles[49], 2),
        f"{label}_p99_ms": round(quantiles[98], 2),
        f"{label}_max_ms": round(latencies[-1], 2),
    }


def prune_under_load(cluster: LocalPostgres, finished: int, concurrency: int) -> dict[str, float]:
    """`finished` workflows past retention and two idle daemons: pickup latency of single
    inserts without a prune, then during `workflowd prune`'s work (engine.retention.prune,
    run here so that it can be timed), and the prune's rate."""
    url = fresh_database(cluster, "bench_retention")
    with psycopg.connect(url, autocommit=True) as conn:
        seed_finished(conn, finished, ago="100 days", failed_every=10)
        with daemons(url, 2, concurrency, KEEP_FOR_EVER):
            figures = latency_ms(conn, "idle", pickups(conn, "idle", BASELINE_INSERTS))
            done = threading.Event()
            pruning: dict[str, Any] = {}

            def run_prune() -> None:
                started = time.monotonic()
                pruning["pruned"] = asyncio.run(prune_with_service(url))
                pruning["seconds"] = time.monotonic() - started
                done.set()

            thread = threading.Thread(target=run_prune)
            thread.start()
            figures |= latency_ms(conn, "pruning", pickups(conn, "pruning", done))
            thread.join()
        (left,) = conn.execute("SELECT count(*) FROM workflows WHERE type = 'noop_1'").fetchone()  # type: ignore[misc]
    assert left == 0, f"{left} finished workflows were not pruned"
    return {
        "finished": finished,
        "prune_seconds": round(pruning["seconds"], 1),
        "pruned_per_s": round(pruning["pruned"] / pruning["seconds"]),
        **figures,
    }


async def prune_with_service(url: str) -> int:
    async with WorkflowService.connect(url) as service:
        pruned = await prune(service.store, RetentionPolicy.from_days(30, 90))
    return sum(count for state, count in pruned.removed.items() if state != "workers")


def stats_cost(cluster: LocalPostgres, rows: int) -> dict[str, float]:
    """The stats call (WorkflowService.get_stats, what GET /admin/stats answers) on a
    table of `rows` workflows (finished evenly over the last 30 days, so some 14,000 of
    ten million in the last hour, and a thousand runnable), beside the full count it replaced, and the
    recount one daemon makes a minute."""
    url = fresh_database(cluster, "bench_stats")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input, user_id, state, completed_at) "
            "SELECT 'type_' || n %% 5, jsonb_build_object('n', n), 'b', "
            "(ARRAY['completed', 'completed', 'completed', 'failed', 'cancelled'])[n %% 5 + 1]::workflow_state, "
            "now() - (n %% 2592000) * interval '1 second' FROM generate_series(1, %s) n",
            (rows,),
        )
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) SELECT 'type_' || n % 5, jsonb_build_object('due', n), 'b' "
            "FROM generate_series(1, 1000) n"
        )
        conn.execute("VACUUM ANALYZE")
        full_ms = mean_ms(lambda: conn.execute(FULL_COUNT).fetchall())
    return asyncio.run(service_stats(url)) | {"rows": rows, "full_count_ms": full_ms}


async def service_stats(url: str) -> dict[str, float]:
    async with WorkflowService.connect(url) as service:
        started = time.perf_counter()
        await recount_finished(service.store, older_than=0)
        recount_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        for _ in range(STATS_SAMPLES):
            await service.get_stats()
        stats_ms = (time.perf_counter() - started) * 1000 / STATS_SAMPLES
    return {"recount_ms": round(recount_ms, 1), "stats_ms": round(stats_ms, 1)}


def mean_ms(run: Any) -> float:
    started = time.perf_counter()
    for _ in range(STATS_SAMPLES):
        run()
    return round((time.perf_counter() - started) * 1000 / STATS_SAMPLES, 1)
