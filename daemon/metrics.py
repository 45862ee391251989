"""Prometheus metrics of one daemon process, all prefixed `workflowd_`.

Each process serves its own counters and histograms. The queue depth is a global number:
one process at a time (the holder of an advisory lock) exports it, from a query cached
for QUEUE_DEPTH_REFRESH_SECONDS, so N daemons neither multiply the number nor the query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg import AsyncConnection

from engine.primary import connect_to_primary
from engine.service import WORKER_STALE_SECONDS_DEFAULT
from engine.sqlfiles import query
from engine.store import Store

LOG = structlog.get_logger("workflowd.metrics")

QUEUE_DEPTH_REFRESH_SECONDS = 15.0
# An arbitrary constant: 'wfdepth!' read as a big-endian int64.
QUEUE_DEPTH_LOCK_ID = int.from_bytes(b"wfdepth!", "big")
STEP_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)
LAG_SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Metrics:
    """The daemon's metrics, registered in their own registry (one per process)."""

    def __init__(self, queue_depth_refresh_seconds: float = QUEUE_DEPTH_REFRESH_SECONDS) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.workflows_started = Counter(
            "workflowd_workflows_started",
            "Workflows this process began running (first claim).",
            ["type"],
            registry=r,
        )
        self.workflows_finished = Counter(
            "workflowd_workflows_finished",
            "Workflows this process brought to a final state.",
            ["type", "state"],
            registry=r,
        )
        self.step_duration = Histogram(
            "workflowd_step_duration_seconds",
            "Wall time of step attempts (and compensations).",
            ["type", "step", "outcome"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.step_attempts = Counter(
            "workflowd_step_attempts", "Step attempts by outcome.", ["type", "step", "outcome"], registry=r
        )
        self.retries = Counter(
            "workflowd_step_retries", "Retries scheduled after failed attempts.", ["type", "step"], registry=r
        )
        self.claim_batch = Histogram(
            "workflowd_claim_batch_size",
            "Workflows claimed per claim statement.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.pickup_lag = Histogram(
            "workflowd_pickup_lag_seconds",
            "Time from a workflow falling due to its claim.",
            buckets=LAG_SECONDS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "workflowd_steps_in_flight", "Workflows this process is driving now.", registry=r
        )
        self.pruned = Counter(
            "workflowd_pruned",
            "Rows retention deleted, by what they were: finished workflows by state (each with "
            "its steps and timeline), and `workers`.",
            ["state"],
            registry=r,
        )
        self.lost_leases = Counter(
            "workflowd_lost_leases", "Results discarded because the lease was lost.", registry=r
        )
        self.database_errors = Counter(
            "workflowd_database_errors",
            "Database errors ridden out, by operation.",
            ["operation"],
            registry=r,
        )
        self.claim_rejections = Counter(
            "workflowd_claim_rejections",
            "Claimed workflows failed instead of run (unreadable or invalid row, definition mismatch, "
            "outcome unknown, worker died), by reason.",
            ["reason"],
            registry=r,
        )
        self.queue_depth = QueueDepthCollector(queue_depth_refresh_seconds)
        r.register(self.queue_depth)


class QueueDepthCollector(Collector):
    """`workflowd_queue_depth{type,state}`, `workflowd_stuck_workflows` and
    `workflowd_unserved_workflows{served}`, exported only while this process holds the lock."""

    def __init__(self, refresh_seconds: float = QUEUE_DEPTH_REFRESH_SECONDS) -> None:
        self.refresh_seconds = refresh_seconds
        self.holder = False
        self.depths: dict[tuple[str, str], int] = {}
        self.stuck = 0
        self.unserved: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "workflowd_queue_depth",
            "Runnable workflows by type and state (exported by one daemon at a time).",
            labels=["type", "state"],
        )
        stuck = GaugeMetricFamily(
            "workflowd_stuck_workflows",
            "Running or compensating workflows no daemon will claim as they stand (a row edited by "
            "hand: due or leased more than an hour ahead); exported by one daemon at a time.",
        )
        unserved = GaugeMetricFamily(
            "workflowd_unserved_workflows",
            "Due workflows no live daemon serves, by served key (`type`, or `type@N` for version N "
            "of its definition): they wait until one does; exported by one daemon at a time.",
            labels=["served"],
        )
        if self.holder:
            for (workflow_type, state), count in sorted(self.depths.items()):
                family.add_metric([workflow_type, state], count)
            stuck.add_metric([], self.stuck)
            for served, count in sorted(self.unserved.items()):
                unserved.add_metric([served], count)
        yield family
        yield stuck
        yield unserved

    async def run_once(self, conn: AsyncConnection[Any]) -> None:
        """Take (or keep) the lock; if held, refresh the cached depths."""
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (QUEUE_DEPTH_LOCK_ID,))
        row = await cursor.fetchone()
        self.holder = bool(row and row[0])
        if self.holder:
            cursor = await conn.execute(query("queue_depth"))
            self.depths = {(str(t), str(s)): int(n) for t, s, n in await cursor.fetchall()}
            cursor = await conn.execute(query("count_stuck_workflows"))
            row = await cursor.fetchone()
            self.stuck = int(row[0]) if row else 0
            self.unserved = await Store(conn).unserved_work(stale_seconds=WORKER_STALE_SECONDS_DEFAULT)

    async def run(self, conninfo: str) -> None:
        """Hold a session of our own (the lock lives as long as it does) and refresh."""
        while True:
            try:
                async with await connect_to_primary(
                    conninfo, autocommit=True, application_name="workflowd-metrics"
                ) as conn:
                    while True:
                        await self.run_once(conn)
                        await asyncio.sleep(self.refresh_seconds)
            except psycopg.OperationalError as error:
                self.holder = False
                LOG.warning("queue_depth_unavailable", error=str(error).strip())
                await asyncio.sleep(self.refresh_seconds)
