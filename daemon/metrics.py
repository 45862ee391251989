"""Prometheus metrics of one daemon process, all prefixed `workflowd_`.

Each process serves its own counters and histograms. The queue depth is a global number:
one process at a time (the holder of an advisory lock) exports it, from a query cached
for QUEUE_DEPTH_REFRESH_SECONDS, so N daemons neither multiply the number nor the query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg import AsyncConnection

from engine.primary import connect_to_primary
from engine.records import TypeFlow
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
        # The event relay's (daemon/relay.py), exported only by a daemon that runs it
        # (export_relay): "no daemon leads" is then an alert of its own, and a fleet with
        # no relay shows none of them. The leader sets the lag gauges and
        # `workflowd_relay_leader` 1; the others leave them at 0.
        self.events_published = Counter(
            "workflowd_events_published",
            "Timeline events the relay published and the broker confirmed.",
            registry=None,
        )
        self.relay_leader = Gauge(
            "workflowd_relay_leader", "1 while this process leads the event relay, else 0.", registry=None
        )
        self.relay_lag_seconds = Gauge(
            "workflowd_relay_lag_seconds",
            "Age of the oldest committed timeline event not yet published (0 when caught up).",
            registry=None,
        )
        self.relay_lag_events = Gauge(
            "workflowd_relay_lag_events",
            "Committed timeline events not yet published (counted up to a million).",
            registry=None,
        )
        self.queue_depth = QueueDepthCollector(queue_depth_refresh_seconds)
        r.register(self.queue_depth)

    def export_relay(self) -> None:
        """Export the relay's metrics: this daemon runs the relay (WORKFLOWD_EVENTS_URL)."""
        relay = (self.events_published, self.relay_leader, self.relay_lag_seconds, self.relay_lag_events)
        for metric in relay:
            self.registry.register(metric)


# Flow control by type (the type_flow query), so that an operator tells "limited"
# (throttled) from "stuck" (due, not throttled, and old): name, help, value (None: none).
FLOW_GAUGES: tuple[tuple[str, str, Callable[[TypeFlow], float | None]], ...] = (
    ("workflowd_in_flight_workflows", "Workflows of a type holding a lease",
     lambda f: f.in_flight),
    ("workflowd_concurrency_limit", "A type's concurrency limit, where it has one",
     lambda f: f.max_concurrency),
    ("workflowd_rate_limit_starts", "A type's rate limit: step starts per period, where it has one",
     lambda f: f.rate_limit_starts),
    ("workflowd_rate_limit_period_seconds", "The period of a type's rate limit, where it has one",
     lambda f: f.rate_period_seconds),
    ("workflowd_rate_period_starts", "Step starts of a rate-limited type in the last period of its rate",
     lambda f: f.started_in_period if f.rate_limit else None),
    ("workflowd_due_workflows", "Due workflows of a type, waiting to be claimed",
     lambda f: f.due),
    ("workflowd_throttled_workflows", "Due workflows of a type that its limits hold back now",
     lambda f: f.throttled),
    ("workflowd_oldest_due_age_seconds", "How long a type's oldest due workflow has waited",
     lambda f: f.oldest_due_age_seconds),
)  # fmt: skip


class QueueDepthCollector(Collector):
    """`workflowd_queue_depth{type,state}`, `workflowd_stuck_workflows`,
    `workflowd_unserved_workflows{served}` and flow control's gauges by type (FLOW_GAUGES),
    exported only while this process holds the lock."""

    def __init__(self, refresh_seconds: float = QUEUE_DEPTH_REFRESH_SECONDS) -> None:
        self.refresh_seconds = refresh_seconds
        self.holder = False
        self.depths: dict[tuple[str, str], int] = {}
        self.stuck = 0
        self.unserved: dict[str, int] = {}
        self.flow: list[TypeFlow] = []

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
        yield from self._flow_families()

    def _flow_families(self) -> Iterator[GaugeMetricFamily]:
        for name, help, value in FLOW_GAUGES:
            gauge = GaugeMetricFamily(name, help + " (exported by one daemon at a time).", labels=["type"])
            for each in self.flow if self.holder else []:
                if (number := value(each)) is not None:
                    gauge.add_metric([each.type], number)
            yield gauge

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
            self.flow = [TypeFlow.of(row) for row in await Store(conn).type_flow()]

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
