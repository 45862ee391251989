"""Priorities: where a workflow's priority comes from (its start, its definition, the
priority its daemons declared for a SQL insert, else 0), the range, an operator's change,
and the claim's order, against a real database."""

from __future__ import annotations

import socket
from typing import Any

import psycopg
import pytest

from engine import (
    DefinitionError,
    InvalidPriorityError,
    PriorityRefusedError,
    Registry,
    Step,
    Workflow,
    WorkflowNotFoundError,
    WorkflowService,
)
from engine.store import StepDefinitions, Store
from tests.factories import insert_workflow
from tests.integration.test_cli import workflowd


def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


BULK = Workflow(type="bulk", priority=40, steps=[Step("only", _noop)])
URGENT = Workflow(type="urgent", priority=-40, steps=[Step("only", _noop)])


def priority_of(db: psycopg.Connection[Any], workflow_id: Any) -> int:
    (priority,) = db.execute("SELECT priority FROM workflows WHERE id = %s", (workflow_id,)).fetchone()  # type: ignore[misc]
    return int(priority)


def sql_insert(db: psycopg.Connection[Any], workflow_type: str, priority: int | None = None) -> Any:
    columns = {"priority": priority} if priority is not None else {}
    return insert_workflow(db, type=workflow_type, **columns)["id"]


def test_a_definitions_priority_is_checked() -> None:
    for bad in (101, -101, True, 1.5):
        with pytest.raises(DefinitionError, match="a priority is a whole number from -100"):
            Workflow(type="bad", priority=bad, steps=[Step("only", _noop)])  # type: ignore[arg-type]


async def test_a_start_takes_its_own_priority_else_its_definitions(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    async with WorkflowService.connect(db_url, Registry([BULK])) as service:
        by_definition = await service.start_workflow("bulk", {"n": 1}, "u")
        chosen = await service.start_workflow("bulk", {"n": 2}, "u", priority=-100)
        unknown = await service.start_workflow("nobody_defines_it", {"n": 3}, "u")
        for bad in (101, -101, True):
            with pytest.raises(InvalidPriorityError, match="from -100 \\(first\\) to 100 \\(last\\)"):
                await service.start_workflow("bulk", {"n": 4}, "u", priority=bad)
    assert (by_definition.priority, chosen.priority, unknown.priority) == (40, -100, 0)
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (3,)


async def test_a_sql_insert_without_a_priority_gets_the_one_its_daemons_declared(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    async with WorkflowService.connect(db_url) as service:
        await register(service.store, Registry([BULK, URGENT]))
    assert priority_of(db, sql_insert(db, "bulk")) == 40
    assert priority_of(db, sql_insert(db, "urgent")) == -40
    assert priority_of(db, sql_insert(db, "urgent", priority=7)) == 7  # the insert's own
    assert priority_of(db, sql_insert(db, "undeclared")) == 0
    # A later release declares another priority: new inserts get it.
    async with WorkflowService.connect(db_url) as service:
        await register(
            service.store, Registry([Workflow(type="bulk", priority=45, version=2, steps=BULK.steps)])
        )
    assert priority_of(db, sql_insert(db, "bulk")) == 45
    with pytest.raises(psycopg.errors.CheckViolation, match="workflows_priority_from_minus_100_to_100"):
        sql_insert(db, "bulk", priority=500)


async def test_an_operator_changes_the_priority_of_a_workflow_still_to_run(
    db_url: str, db: psycopg.Connection[Any], service: WorkflowService
) -> None:
    pending = sql_insert(db, "bulk")
    changed = await service.set_priority(pending, -10)
    assert (changed.priority, priority_of(db, pending)) == (-10, -10)
    finished = insert_workflow(db, type="bulk", state="completed")["id"]
    with pytest.raises(PriorityRefusedError, match="is completed: only one still to run"):
        await service.set_priority(finished, 1)
    with pytest.raises(WorkflowNotFoundError):
        await service.set_priority("00000000-0000-0000-0000-000000000000", 1)
    with pytest.raises(InvalidPriorityError):
        await service.set_priority(pending, 1000)
    assert priority_of(db, pending) == -10

    result = workflowd("set-priority", str(pending), "25", env={"DATABASE_URL": db_url})
    assert (result.returncode, result.stdout.strip()) == (0, f"workflow {pending}: priority 25"), (
        result.stderr
    )
    refused = workflowd("set-priority", str(finished), "25", env={"DATABASE_URL": db_url})
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        f"workflow {finished} is completed: only one still to run has a priority to change"
    )


async def test_the_claim_takes_due_work_by_priority_then_by_due_time(
    db_url: str, db: psycopg.Connection[Any], service: WorkflowService
) -> None:
    for n in range(5):
        insert_workflow(db, type="bulk", priority=40, input={"n": n})
    db.execute("UPDATE workflows SET next_retry_at = now() - interval '1 hour'")  # long due
    late_urgent = sql_insert(db, "bulk", priority=-40)
    early_urgent = sql_insert(db, "bulk", priority=-40)
    db.execute(
        "UPDATE workflows SET next_retry_at = now() - interval '1 minute' WHERE id = %s", (early_urgent,)
    )
    claimed = await claim(service.store, limit=3)
    assert claimed[:2] == [early_urgent, late_urgent]
    assert priority_of(db, claimed[2]) == 40


async def register(store: Store, registry: Registry) -> None:
    await store.register_worker(
        worker_id=f"test-{len(registry)}", host=socket.gethostname(), pid=1, types=registry.types,
        priorities=registry.priorities, limits=registry.limits, served=registry.served,
        concurrency=1,
    )  # fmt: skip


async def claim(store: Store, limit: int) -> list[Any]:
    async with store.claiming_transaction() as tx:
        rows = await tx.claim_due_workflows(
            worker_id="test", served=["bulk"], limit=limit, lease_seconds=30, busy=[],
            definitions=StepDefinitions.of([BULK]),
        )  # fmt: skip
    return [row.id for row in rows]
