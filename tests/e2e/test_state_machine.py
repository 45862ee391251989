"""The state machines of engine/states.py are the ones the SQL writes: a tour of the life
cycles, against a real daemon, records every arrow of the tables and nothing else.

The SQL queries perform the transitions; engine/states.py holds the tables that the
service's refusals and these tests read. This test keeps the two from drifting: each
arrow of a table must appear in the timeline of the tour, and each transition of the
timeline must be an arrow (or one of the two bookkeeping self-arrows).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from engine import WorkflowService
from engine.states import STEP_TRANSITIONS, WORKFLOW_TRANSITIONS
from tests.e2e.conftest import Daemons, all_finished, insert_workflows, wait_until

# Written only by migration 0005, to fail rows inserted before its rules (see
# tests/integration/test_migrate.py); a claim moves a row to running before it fails it.
MIGRATION_ONLY = {("workflow", "pending", "failed")}
# Bookkeeping, not transitions: an interrupted step started again, a failed attempt of a
# compensation recorded. Allowed in any timeline, needed in none.
SELF_ARROWS = {("step", "running", "running"), ("step", "compensating", "compensating")}


def arrows() -> set[tuple[str, str, str]]:
    return {
        (table.kind, str(source), str(target))
        for table in (WORKFLOW_TRANSITIONS, STEP_TRANSITIONS)
        for source, targets in table.arrows.items()
        for target in targets
    }


def recorded(db: psycopg.Connection[Any]) -> set[tuple[str, str, str]]:
    rows = db.execute(
        "SELECT DISTINCT CASE WHEN step_index IS NULL THEN 'workflow' ELSE 'step' END, from_state, to_state "
        "FROM workflow_events WHERE from_state IS NOT NULL"
    ).fetchall()
    return {(kind, source, target) for kind, source, target in rows}


def test_a_tour_of_the_life_cycles_records_every_arrow_of_the_tables_and_nothing_else(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    # Straight through; a retry after a failed attempt; a saga that fails and compensates;
    insert_workflows(db, "three_steps", 1)
    insert_workflows(db, "retrying", 1, fail_times=1)
    insert_workflows(db, "saga", 1, fail_at="ship")
    # A step that snoozes once (running -> pending) before it completes.
    insert_workflows(db, "snoozing", 1, snoozes=1, every=0.1)
    wait_until(lambda: all_finished(db, 3) and all_finished(db, 1, "compensated"), 30, "the first four")

    async def operators() -> None:
        async with WorkflowService.connect(db_url) as service:
            # A pending workflow cancelled at once.
            nobody = await service.start_workflow("served_by_nobody", {}, "tour")
            await service.cancel_workflow(nobody.id)
            # A running saga cancelled at a step boundary, then compensated.
            cancelled = await service.start_workflow("cancellable_saga", {"sleep": 1.5}, "tour")
            await wait_for_state(service, cancelled.id, "running")
            await asyncio.sleep(0.5)
            await service.cancel_workflow(cancelled.id)
            await service.wait_for(cancelled.id, timeout=20)
            # A failure retried by hand, failing again; then a compensation that fails.
            plain = await service.start_workflow("plain_failing", {"fail_at": "charge"}, "tour")
            await service.wait_for(plain.id, timeout=20)
            await service.retry_workflow(plain.id)
            await wait_for_state(service, plain.id, "failed")
            db.execute("INSERT INTO test_switches VALUES ('break:undo:reserve')")
            await service.compensate_workflow(plain.id)
            await wait_for_state(service, plain.id, "failed")

    asyncio.run(operators())
    seen = recorded(db)
    assert seen <= arrows() | SELF_ARROWS, seen - arrows() - SELF_ARROWS
    assert arrows() - MIGRATION_ONLY <= seen, arrows() - MIGRATION_ONLY - seen


async def wait_for_state(service: WorkflowService, workflow_id: Any, state: str) -> None:
    for _ in range(400):
        workflow = await service.get_workflow(workflow_id)
        if workflow.state == state and not workflow.cancel_requested:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"workflow {workflow_id} never became {state}")
