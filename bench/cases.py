"""Benchmark cases beside the daemon's throughput: the database's own limit, the claim's
cost with a million finished workflows, and the resident memory of a busy daemon."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.daemon import DRAINED, daemons, fresh_database, wait_until_drained
from bench.flows import noop_1
from daemon.local_postgres import LocalPostgres
from engine.sqlfiles import query
from engine.store import StepDefinitions

SQL_LIMIT_CONNECTIONS = 8
SQL_LIMIT_BATCH = 100
CLAIM_SAMPLES = 200


def sql_limit(cluster: LocalPostgres, rows: int = 20_000) -> dict[str, float]:
    """Rows/s of a plain-SQL loop that claims with SKIP LOCKED and completes in batches:
    the most this database can give a queue, to read every other figure against."""
    url = fresh_database(cluster, "bench_sql_limit")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) SELECT 'limit', jsonb_build_object('n', n), 'b' "
            "FROM generate_series(1, %s) n",
            (rows,),
        )

    def drain() -> None:
        with psycopg.connect(url) as conn:
            while True:
                with conn.transaction():
                    done = conn.execute(
                        "WITH due AS (SELECT id FROM workflows WHERE state IN ('pending', 'running', 'compensating') "
                        "AND next_retry_at <= now() ORDER BY priority, next_retry_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                        "UPDATE workflows w SET state = 'completed', completed_at = now() FROM due WHERE w.id = due.id",
                        (SQL_LIMIT_BATCH,),
                    ).rowcount
                if not done:
                    return

    started = time.monotonic()
    threads = [threading.Thread(target=drain) for _ in range(SQL_LIMIT_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "rows": rows,
        "connections": SQL_LIMIT_CONNECTIONS,
        "batch": SQL_LIMIT_BATCH,
        "rows_per_s": round(rows / elapsed),
    }


def claim_cost(cluster: LocalPostgres, finished: int = 1_000_000) -> dict[str, float]:
    """Mean time of the daemon's own claim statement (claiming nothing it keeps) with an
    empty table and with `finished` completed workflows in it."""
    url = fresh_database(cluster, "bench_claim_cost")
    begin, claim = query("claiming_transaction"), query("claim_due_workflows")
    params = {
        "worker_id": "bench",
        "served": ["noop_1", "noop_1@1"],
        "limit": 10,
        "lease_seconds": 30,
        "busy": [],
    } | StepDefinitions.of([noop_1]).shapes

    def mean_ms(conn: psycopg.Connection[tuple[object, ...]]) -> float:
        conn.execute("INSERT INTO workflows (type, input, user_id) SELECT 'noop_1', jsonb_build_object('c', n), 'b' "
                     "FROM generate_series(1, 10) n ON CONFLICT (idempotency_key) DO NOTHING")  # fmt: skip
        started = time.perf_counter()
        for _ in range(CLAIM_SAMPLES):
            conn.execute(begin)
            conn.execute(claim, params).fetchall()
            conn.execute("ROLLBACK")  # claim and give back: the same rows every time
        return (time.perf_counter() - started) / CLAIM_SAMPLES * 1000

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(query("pin_hot_plans"))  # as the worker's sessions run it
        empty = mean_ms(conn)
        conn.execute(
            "INSERT INTO workflows (type, input, user_id, state, completed_at) "
            "SELECT 'noop_1', jsonb_build_object('n', n), 'b', 'completed', now() FROM generate_series(1, %s) n",
            (finished,),
        )
        conn.execute("VACUUM ANALYZE workflows")
        full = mean_ms(conn)
    return {"empty_ms": round(empty, 3), "finished_rows": finished, "with_finished_ms": round(full, 3),
            "change_percent": round(100 * (full - empty) / empty, 1)}  # fmt: skip


def large_tables(cluster: LocalPostgres, finished: int, due: int, concurrency: int) -> dict[str, float]:
    """Two daemons draining `due` one-step workflows into empty tables, then the same
    beside `finished` finished ones, each with its step row and its four timeline rows:
    the tables of a service that has run for a while. Both drains start right after a
    checkpoint, as the building of the large tables would otherwise bring one into the
    second drain alone (its full-page images doubled the WAL of that drain). Timed by the
    database, like the throughput cases."""
    empty = drain_beside(cluster, 0, due, concurrency)
    large = drain_beside(cluster, finished, due, concurrency)
    return {
        "finished": finished,
        "due": due,
        "empty_workflows_per_s": empty,
        "workflows_per_s": large,
        "large_over_empty": round(large / empty, 2),
    }


def seed_finished(
    conn: psycopg.Connection[Any], finished: int, *, ago: str = "0 seconds", failed_every: int = 0
) -> None:
    """`finished` one-step workflows finished `ago` (an interval), each with its step row
    and its four timeline rows, as a service's tables hold them, then analyzed; every
    `failed_every`-th one failed (0: none), the others completed."""
    conn.execute(
        "INSERT INTO workflows (idempotency_key, type, input, user_id, state, total_steps, current_step_index, "
        "output, context, started_at, completed_at) "
        "SELECT 'finished:' || n, 'noop_1', jsonb_build_object('n', n), 'b', "
        "CASE WHEN %(every)s > 0 AND n %% %(every)s = 0 THEN 'failed' ELSE 'completed' END::workflow_state, 1, 1, "
        "'{}', '{\"only\": {}}', now() - %(ago)s::interval, now() - %(ago)s::interval FROM generate_series(1, %(n)s) n",
        {"every": failed_every, "ago": ago, "n": finished},
    )
    conn.execute(
        "INSERT INTO workflow_steps (workflow_id, step_index, step_name, state, output, idempotency_key, attempt, "
        "started_at, completed_at) "
        "SELECT id, 0, 'only', 'completed', '{}', 'step:' || idempotency_key, 1, started_at, completed_at "
        "FROM workflows"
    )
    conn.execute(
        "INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt) "
        "SELECT id, e.step_index, e.step_name, e.from_state, e.to_state, e.attempt FROM workflows, "
        "(VALUES (NULL, NULL, 'pending', 'running', NULL), (0, 'only', 'pending', 'running', 1), "
        "(0, 'only', 'running', 'completed', 1), (NULL, NULL, 'running', 'completed', NULL)) "
        "AS e(step_index, step_name, from_state, to_state, attempt)"
    )
    conn.execute("VACUUM ANALYZE")


def drain_beside(cluster: LocalPostgres, finished: int, due: int, concurrency: int) -> int:
    """Workflows/s of two daemons draining `due` one-step workflows beside `finished`."""
    url = fresh_database(cluster, "bench_large")
    with psycopg.connect(url, autocommit=True) as conn:
        seed_finished(conn, finished)
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) SELECT 'noop_1', jsonb_build_object('due', n), 'b' "
            "FROM generate_series(1, %s) n",
            (due,),
        )
        (burst_at,) = conn.execute("SELECT max(created_at) FROM workflows").fetchone()  # type: ignore[misc]
        conn.execute("CHECKPOINT")
        with daemons(url, 2, concurrency):
            wait_until_drained(conn)
        (seconds,) = conn.execute(
            "SELECT extract(epoch FROM max(completed_at) - min(started_at)) FROM workflows WHERE created_at >= %s",
            (burst_at,),
        ).fetchone()  # type: ignore[misc]
    return round(due / float(seconds))


def resident_memory(
    cluster: LocalPostgres, concurrency: int = 100, workflows: int = 2_000
) -> dict[str, float]:
    """Peak resident memory of one daemon draining three-step workflows at `concurrency`."""
    url = fresh_database(cluster, "bench_memory")
    peak = 0
    with daemons(url, 1, concurrency) as (process,), psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) SELECT 'noop_3', jsonb_build_object('n', n), 'b' "
            "FROM generate_series(1, %s) n",
            (workflows,),
        )
        status = Path(f"/proc/{process.pid}/status")
        while conn.execute(DRAINED).fetchone() == (False,):
            rss = next(
                int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS")
            )
            peak = max(peak, rss)
            time.sleep(0.05)
    return {"concurrency": concurrency, "peak_rss_mb": round(peak / 1024, 1)}
