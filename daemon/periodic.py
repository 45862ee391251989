"""The daemon's periodic tasks, beside the worker: retention (every
WORKFLOWD_RETENTION_INTERVAL seconds, prune what has been kept long enough;
engine/retention.py) and cron schedules (declare the schedules of the daemon's code,
then every WORKFLOWD_SCHEDULE_INTERVAL seconds fire the due ticks;
engine/schedule_runner.py), the recount of finished workflows for stats (every
minute; engine/counts.py), and the rekey of flow control (every few seconds; a type's
rows get their new key when its limits change; engine/flow.py). Every daemon runs all
four: the retention lock lets one prune at a time, each due schedule is fired by one
daemon (its row lock), each tick once (the cursor and the key), one daemon a minute
recounts (its lock and the count's age), and each rekey request is worked on by one
daemon at a time (its row lock)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.metrics import Metrics
from engine.counts import RECOUNT_INTERVAL_SECONDS, recount_finished
from engine.errors import WorkflowEngineError
from engine.flow import REKEY_INTERVAL_SECONDS, rekey
from engine.registry import Registry
from engine.retention import RetentionPolicy, prune
from engine.schedule_runner import fire_due_schedules
from engine.service import WorkflowService
from engine.store import Store

LOG = structlog.get_logger("workflowd")


async def every(interval: float, work: Callable[[], Awaitable[None]], failed_event: str) -> None:
    """Run `work` every `interval` seconds until cancelled. A database error is logged as
    `failed_event` and the next round tries again: what it would have done is still to
    do then."""
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except (psycopg.Error, PoolTimeout) as error:
            LOG.warning(failed_event, error=" ".join(str(error).split()) or type(error).__name__)


async def prune_periodically(
    pool: AsyncConnectionPool, policy: RetentionPolicy, interval: float, metrics: Metrics
) -> None:
    store = Store(pool)

    async def prune_once() -> None:
        removed = (await prune(store, policy)).removed
        for state, count in removed.items():
            metrics.pruned.labels(state).inc(count)
        if removed.total():
            LOG.info("pruned", **{state: count for state, count in removed.items() if count})

    await every(interval, prune_once, "prune_failed")


async def recount_periodically(pool: AsyncConnectionPool) -> None:
    store = Store(pool)

    async def recount_once() -> None:
        await recount_finished(store, older_than=RECOUNT_INTERVAL_SECONDS / 2)

    await every(RECOUNT_INTERVAL_SECONDS, recount_once, "recount_failed")


async def rekey_periodically(pool: AsyncConnectionPool) -> None:
    store = Store(pool)

    async def rekey_once() -> None:
        if rekeyed := await rekey(store):
            LOG.info("flow_rekeyed", workflows=rekeyed)

    await every(REKEY_INTERVAL_SECONDS, rekey_once, "rekey_failed")


async def fire_periodically(
    pool: AsyncConnectionPool, registry: Registry, worker_id: str, interval: float
) -> None:
    store = Store(pool)
    declared = False

    async def fire_once() -> None:
        nonlocal declared
        if not declared:
            await declare_schedules(store, registry)
            declared = True
        for schedule in await fire_due_schedules(store, registry, worker_id):
            for problem in schedule.problems:
                LOG.error("schedule_problem", schedule=schedule.name, problem=problem)
            if schedule.ticks:
                LOG.info("schedule_fired", schedule=schedule.name, ticks=schedule.ticks,
                         workflow_id=str(schedule.workflow_id))  # fmt: skip

    await every(interval, fire_once, "schedules_not_fired")


async def declare_schedules(store: Store, registry: Registry) -> None:
    """Upsert the schedules declared in the code this daemon runs (once, at its start).
    One that cannot be (its input invalid for its type) is logged; the others go on."""
    service = WorkflowService(store, registry)
    for schedule in registry.schedules.values():
        try:
            await service.declare_schedule(schedule)
        except WorkflowEngineError as error:
            LOG.error("schedule_not_declared", schedule=schedule.name, reason=str(error))
