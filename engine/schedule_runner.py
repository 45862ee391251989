"""Firing due schedules: each due tick starts its workflow, once, whatever the number of
daemons (see sql/migrations/0011_schedules.sql for why no leader is needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from engine.errors import WorkflowEngineError
from engine.registry import Registry
from engine.schedules import ScheduleError, due_ticks, next_tick, tick_key
from engine.service import WorkflowService
from engine.store import Row, Store

# Schedules one firing transaction takes at most; more are left to the next pass or to
# another daemon (SKIP LOCKED).
SCHEDULES_A_PASS = 50


@dataclass(frozen=True)
class Fired:
    """A schedule's pass: the ticks it fired, the workflow of the last, and what went
    wrong (a tick refused, the schedule paused), for the caller to log."""

    name: str
    ticks: int
    workflow_id: UUID | None
    problems: tuple[str, ...] = ()


async def fire_due_schedules(store: Store, registry: Registry, worker_id: str) -> list[Fired]:
    """One transaction: lock the due schedules others are not firing, start a workflow
    for each due tick (key schedule:{name}:{tick}), move each schedule's next tick on."""
    async with store.transaction() as tx:
        service = WorkflowService(tx, registry)
        return [
            await _fire(service, tx, row, worker_id) for row in await tx.due_schedules(limit=SCHEDULES_A_PASS)
        ]


async def _fire(service: WorkflowService, tx: Store, row: Row, worker_id: str) -> Fired:
    name = row["name"]
    try:
        ticks = due_ticks(row["cron"], row["timezone"], row["next_fire_at"], row["now"], row["missed"])
        following = next_tick(row["cron"], row["timezone"], ticks[-1] if ticks else row["now"])
    except ScheduleError as error:
        # A row written by hand with a bad expression or zone: paused, and said once.
        await tx.set_schedule_enabled(name, enabled=False, next_fire_at=None)
        return Fired(name, 0, None, (f"paused: {error}",))
    workflow_id, problems = None, []
    for tick in ticks:
        try:
            workflow_id = await _start(service, tx, row, tick_key(name, tick))
        except WorkflowEngineError as error:  # the tick is skipped, the schedule goes on
            problems.append(f"tick {tick.isoformat()} refused: {error}")
    await tx.schedule_fired(
        name=name, next_fire_at=following, fired_at=ticks[-1] if ticks else None, workflow_id=workflow_id,
        worker_id=worker_id,
    )  # fmt: skip
    return Fired(name, len(ticks), workflow_id, tuple(problems))


async def _start(service: WorkflowService, tx: Store, row: Row, key: str) -> UUID:
    """The tick's workflow (the existing one, if the key was used already)."""
    input: dict[str, Any] = row["input"]
    async with tx.savepoint():  # a refused start leaves the transaction usable
        result = await service.start(row["type"], input, row["user_id"], idempotency_key=key)
    return result.workflow.id
