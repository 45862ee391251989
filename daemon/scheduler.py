"""The daemon's schedule loop: it declares the schedules of the daemon's code, then every
WORKFLOWD_SCHEDULE_INTERVAL seconds fires the due ticks of cron schedules
(engine/schedule_runner.py). Every daemon runs it; each due schedule is fired by one of
them (its row lock), each tick once (the cursor and the key)."""

from __future__ import annotations

import asyncio

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from engine.errors import WorkflowEngineError
from engine.registry import Registry
from engine.schedule_runner import fire_due_schedules
from engine.service import WorkflowService
from engine.store import Store

LOG = structlog.get_logger("workflowd")


async def fire_periodically(
    pool: AsyncConnectionPool, registry: Registry, worker_id: str, interval: float
) -> None:
    """Until cancelled. A database error is logged and the next round tries again: the
    ticks it would have fired are still due then."""
    store = Store(pool)
    declared = False
    while True:
        await asyncio.sleep(interval)
        try:
            if not declared:
                await declare_schedules(store, registry)
                declared = True
            fired = await fire_due_schedules(store, registry, worker_id)
        except (psycopg.Error, PoolTimeout) as error:
            LOG.warning("schedules_not_fired", error=" ".join(str(error).split()) or type(error).__name__)
            continue
        for schedule in fired:
            for problem in schedule.problems:
                LOG.error("schedule_problem", schedule=schedule.name, problem=problem)
            if schedule.ticks:
                LOG.info("schedule_fired", schedule=schedule.name, ticks=schedule.ticks,
                         workflow_id=str(schedule.workflow_id))  # fmt: skip


async def declare_schedules(store: Store, registry: Registry) -> None:
    """Upsert the schedules declared in the code this daemon runs (once, at its start).
    One that cannot be (its input invalid for its type) is logged; the others go on."""
    service = WorkflowService(store, registry)
    for schedule in registry.schedules.values():
        try:
            await service.declare_schedules([schedule])
        except WorkflowEngineError as error:
            LOG.error("schedule_not_declared", schedule=schedule.name, reason=str(error))
