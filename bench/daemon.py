"""The daemon's own cases: no-op throughput drained by daemon processes, and pickup
latency (SQL insert commit to step start) while the daemons are idle."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.primary import PrimaryCost, process_cpu_seconds
from daemon.local_postgres import LocalPostgres, free_port
from engine.definitions import Workflow
from engine.registry import Registry
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]


def drop_database(cluster: LocalPostgres, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def empty_database(cluster: LocalPostgres, name: str) -> str:
    """A new, empty database `name` (dropped first if a failed run left it)."""
    drop_database(cluster, name)
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return cluster.url(name)


def fresh_database(cluster: LocalPostgres, name: str) -> str:
    """A new database `name` with the daemon's schema."""
    url = empty_database(cluster, name)
    subprocess.run(
        [sys.executable, "-m", "daemon", "migrate"],
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        capture_output=True,
    )
    return url


@contextmanager
def daemons(
    url: str,
    count: int,
    concurrency: int,
    settings: dict[str, str] | None = None,
    modules: str = "bench.flows",
) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "WORKFLOWD_MODULES": modules,
        "WORKFLOWD_CONCURRENCY": str(concurrency),
        "WORKFLOWD_LOG_LEVEL": "warning",
        "WORKFLOWD_BUILTINS": "false",
        **(settings or {}),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env={**env, "PORT": str(free_port())},
            stdout=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    try:
        with psycopg.connect(url) as conn:
            while (
                conn.execute("SELECT count(*) FROM workflow_workers WHERE stopped_at IS NULL").fetchone()[0]
                < count
            ):  # type: ignore[index]
                time.sleep(0.05)
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def wait_until_drained(
    conn: psycopg.Connection[Any], on_poll: Callable[[psycopg.Connection[Any]], None] | None = None
) -> None:
    """Until no workflow is left to run: a cheap question (the claim's partial index
    answers it), so that watching costs the machine next to nothing."""
    while conn.execute(DRAINED).fetchone() == (False,):
        if on_poll:
            on_poll(conn)
        time.sleep(0.05)


DRAINED = "SELECT NOT EXISTS (SELECT 1 FROM workflows WHERE state IN ('pending', 'running', 'compensating'))"


def throughput(
    cluster: LocalPostgres,
    processes: int,
    workflows: int,
    concurrency: int,
    steps: int = 3,
    *,
    plain: bool = False,
    workflow: Workflow | None = None,
    users: int = 1,
    modules: str = "bench.flows",
    settings: dict[str, str] | None = None,
) -> dict[str, float]:
    """Insert `workflows` no-op workflows of `steps` steps first, then drain them with
    `processes` daemons; timed by the database, from the first claim to the last completion.
    Also what the drain cost the server and the daemons (bench/primary.py). `plain`: the
    steps are plain functions (run in the daemon's thread pool), not coroutines.
    `workflow`: another one-step type of `modules` (the daemons' WORKFLOWD_MODULES);
    `users`: the workflows belong to that many users, in turn. `settings`: more of the
    daemons' environment (bench/tracing.py turns tracing on so)."""
    name = f"bench_throughput_{processes}"
    url = fresh_database(cluster, name)
    with psycopg.connect(url, autocommit=True) as conn:
        if workflow is not None:
            declare(url, workflow)  # as its daemons will, before the insert reads it
        conn.execute(
            "INSERT INTO workflows (type, input, user_id) SELECT %s, jsonb_build_object('n', n), 'user-' || n %% %s "
            "FROM generate_series(1, %s) n",
            (
                workflow.type if workflow else f"noop_sync_{steps}" if plain else f"noop_{steps}",
                users,
                workflows,
            ),
        )
        cost = PrimaryCost(cluster, name)
        with daemons(url, processes, concurrency, settings, modules=modules) as running:
            cost.start(conn)
            daemon_cpu_at_start = sum(process_cpu_seconds(process.pid) for process in running)
            wait_until_drained(conn, cost.sample)
            daemon_cpu = sum(process_cpu_seconds(process.pid) for process in running) - daemon_cpu_at_start
        primary = cost.finish(conn, workflows, steps)
        row = conn.execute(
            "SELECT extract(epoch FROM max(completed_at) - min(started_at)) FROM workflows"
        ).fetchone()
    elapsed = float(row[0])  # type: ignore[index]
    return {
        "processes": processes,
        "steps": steps,
        "seconds": round(elapsed, 2),
        "workflows_per_s": round(workflows / elapsed),
        "steps_per_s": round(steps * workflows / elapsed),
        "daemon_cpu_ms_per_workflow": round(1000 * daemon_cpu / workflows, 3),
        **primary,
    }


def declare(url: str, *workflows: Workflow) -> None:
    """Declare the priority, limits and fairness of bench types in workflow_types, as a
    daemon serving them does when it registers (the insert trigger reads them)."""
    registry = Registry(workflows)

    async def register() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await Store(conn).register_worker(
                worker_id="bench", host="bench", pid=0, types=registry.types, priorities=registry.priorities,
                limits=registry.limits, served=registry.served, concurrency=1,
            )  # fmt: skip
            await conn.execute("UPDATE workflow_workers SET stopped_at = now() WHERE id = 'bench'")

    asyncio.run(register())


TRICKLE = 200
TRICKLE_GAP_SECONDS = 0.02
NEARLY_EMPTY = 50


def burst_after_idle(cluster: LocalPostgres, workflows: int, concurrency: int) -> dict[str, float]:
    """The normal life of the service: two idle daemons, a trickle of single inserts, then
    one INSERT of `workflows`; drained once with the statistics of a nearly empty table,
    once with the tables analyzed, each timed by the database. Autovacuum is off on the
    tables, standing in for the minute it may take to reach them after the burst: the
    stale case stays stale for its whole drain, every run."""
    url = fresh_database(cluster, "bench_burst")
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("workflows", "workflow_steps", "workflow_events"):
            conn.execute(
                sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(sql.Identifier(table))
            )
        insert = "INSERT INTO workflows (type, input, user_id) SELECT 'noop_1', jsonb_build_object(%s::text, n), 'b' FROM generate_series(1, %s) n"
        rates = {}
        with daemons(url, 2, concurrency):
            conn.execute(insert, ("early", NEARLY_EMPTY))
            wait_until_drained(conn)
            conn.execute("ANALYZE")
            for case in ("stale_statistics", "analyzed"):
                for n in range(TRICKLE):  # the idle daemons' plans are made now
                    conn.execute(insert, (f"{case}_trickle_{n}", 1))
                    time.sleep(TRICKLE_GAP_SECONDS)
                wait_until_drained(conn)
                (burst_at,) = conn.execute("SELECT now()").fetchone()  # type: ignore[misc]
                conn.execute(insert, (case, workflows))
                wait_until_drained(conn)
                (seconds,) = conn.execute(
                    "SELECT extract(epoch FROM max(completed_at) - min(started_at)) FROM workflows "
                    "WHERE created_at >= %s",
                    (burst_at,),
                ).fetchone()  # type: ignore[misc]
                rates[case] = round(workflows / float(seconds))
                conn.execute("ANALYZE")  # the next case runs on well-analyzed tables
    return {
        "workflows": workflows,
        "stale_statistics_workflows_per_s": rates["stale_statistics"],
        "analyzed_workflows_per_s": rates["analyzed"],
        "stale_over_analyzed": round(rates["stale_statistics"] / rates["analyzed"], 2),
    }


def pickup_latency(cluster: LocalPostgres, inserts: int, concurrency: int) -> dict[str, float]:
    url = fresh_database(cluster, "bench_pickup")
    committed: dict[int, float] = {}
    with daemons(url, 2, concurrency), psycopg.connect(url, autocommit=True) as conn:
        time.sleep(1)  # idle daemons, listening
        for n in range(inserts):
            conn.execute(
                "INSERT INTO workflows (type, input, user_id) VALUES ('pickup', %s, 'bench')",
                (json.dumps({"n": n}),),
            )
            committed[n] = time.time()
            time.sleep(0.01)
        wait_until_drained(conn)
        rows = conn.execute(
            "SELECT (input->>'n')::int, (output->>'started')::float8 FROM workflows"
        ).fetchall()
    latencies = sorted((started - committed[n]) * 1000 for n, started in rows)
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "inserts": inserts,
        "p50_ms": round(quantiles[49], 2),
        "p95_ms": round(quantiles[94], 2),
        "p99_ms": round(quantiles[98], 2),
    }
