"""The daemon's retention loop: every WORKFLOWD_RETENTION_INTERVAL seconds, prune what
the retention settings say has been kept long enough (engine/retention.py). Every daemon
runs it; the retention lock lets one at a time prune, so a fleet prunes like one process."""

from __future__ import annotations

import asyncio

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.metrics import Metrics
from engine.retention import RetentionPolicy, prune
from engine.store import Store

LOG = structlog.get_logger("workflowd")


async def prune_periodically(
    pool: AsyncConnectionPool, policy: RetentionPolicy, interval: float, metrics: Metrics
) -> None:
    """Until cancelled. A database error is logged and the next round tries again: the
    workflows it would have deleted are still there then."""
    store = Store(pool)
    while True:
        await asyncio.sleep(interval)
        try:
            removed = (await prune(store, policy)).removed
        except (psycopg.Error, PoolTimeout) as error:
            LOG.warning("prune_failed", error=" ".join(str(error).split()) or type(error).__name__)
            continue
        for state, count in removed.items():
            metrics.pruned.labels(state).inc(count)
        if removed.total():
            LOG.info("pruned", **{state: count for state, count in removed.items() if count})
