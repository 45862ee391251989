"""Every write of a result is fenced by the lease token, and a commit whose answer was
lost is settled from the rows: on a real database, with the lease taken over by hand."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
import structlog
from psycopg_pool import AsyncConnectionPool

from daemon.driver import Assignment, Driver, DriverConfig
from daemon.metrics import Metrics
from engine import Step, Workflow
from engine.attempts import ClaimedWorkflow, Run, decide
from engine.registry import Registry
from engine.retry import DEFAULT_RETRY_POLICY
from engine.runner import StepSucceeded
from engine.store import Advanced, Completion, FailedAttempt, StepDefinitions, Store
from tests.factories import insert_workflow

WORKER = "worker-a"


async def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


async def _undo(input: Any, output: Any, ctx: Any) -> None:
    return None


THREE = Workflow(
    type="three",
    steps=[Step("one", _noop, compensate=_undo), Step("two", _noop), Step("three", _noop)],
)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
        yield pool


async def claim_one(store: Store) -> ClaimedWorkflow:
    async with store.claiming_transaction() as tx:
        (row,) = await tx.claim_due_workflows(
            worker_id=WORKER,
            served=Registry([THREE]).served,
            limit=1,
            lease_seconds=30,
            busy=[],
            definitions=(definitions := StepDefinitions.of([THREE])),
        )
        if row.first_claim:
            await tx.create_steps(worker_id=WORKER, digests={row.id: "d"}, definitions=definitions)
    return row


def steal(db: psycopg.Connection[Any], row: ClaimedWorkflow) -> None:
    """Another worker took the lease over (this one was stopped past it)."""
    db.execute("UPDATE workflows SET lease_token = gen_random_uuid() WHERE id = %s", (row.id,))


def snapshot(db: psycopg.Connection[Any], row: ClaimedWorkflow) -> tuple[Any, ...]:
    return (
        db.execute("SELECT w FROM workflows w WHERE id = %s", (row.id,)).fetchall(),
        db.execute("SELECT s FROM workflow_steps s WHERE workflow_id = %s", (row.id,)).fetchall(),
        db.execute("SELECT count(*) FROM workflow_events WHERE workflow_id = %s", (row.id,)).fetchall(),
    )


def failed_attempt(row: ClaimedWorkflow, *, compensation: bool = False) -> FailedAttempt:
    error = {"type": "RuntimeError", "message": "boom", "step": "one", "attempt": 1}
    return FailedAttempt(row.id, row.lease_token, 0, 1, error, "", WORKER, compensation=compensation)


@pytest.mark.parametrize(
    "write",
    [
        lambda store, row: store.schedule_retry(failed_attempt(row), delay_seconds=1),
        lambda store, row: store.fail_workflow(failed_attempt(row)),
    ],
    ids=["retry", "failure"],
)
async def test_a_stale_workers_retry_or_failure_writes_nothing(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any], write: Any
) -> None:
    insert_workflow(db, type="three")
    row = await claim_one(Store(pool))
    steal(db, row)
    before = snapshot(db, row)
    assert await write(Store(pool), row) is False
    assert snapshot(db, row) == before


async def test_a_stale_workers_compensation_writes_nothing(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    store = Store(pool)
    insert_workflow(db, type="three")
    row = await claim_one(store)
    await store.complete_steps(
        [Completion(row.id, row.lease_token, 0, 1, "{}", go_on=False)], worker_id=WORKER
    )
    db.execute("UPDATE workflows SET state = 'failed' WHERE id = %s", (row.id,))
    db.execute("SELECT workflow_begin_compensation(%s, NULL)", (row.id,))
    compensating = await claim_one(store)
    assert compensating.compensating
    steal(db, compensating)
    before = snapshot(db, compensating)
    written = await store.complete_compensation(
        workflow_id=row.id, lease_token=compensating.lease_token, step_index=0, attempt=1, go_on=True,
        worker_id=WORKER,
    )  # fmt: skip
    assert written is None
    assert (
        await store.schedule_retry(failed_attempt(compensating, compensation=True), delay_seconds=1) is False
    )
    assert await store.fail_workflow(failed_attempt(compensating, compensation=True)) is False
    assert snapshot(db, compensating) == before


class AnswerLostOnce(Store):
    """The real store, whose first batch of at least `size` completions commits and then
    loses its answer, as when the connection drops between the server's COMMIT and its
    reply."""

    def __init__(self, pool: AsyncConnectionPool, *, size: int) -> None:
        super().__init__(pool)
        self.size = size
        self.lost = False

    async def complete_steps(
        self, completions: Sequence[Completion], *, worker_id: str
    ) -> dict[Any, Advanced]:
        rows = await super().complete_steps(completions, worker_id=worker_id)
        if len(completions) >= self.size and not self.lost:
            self.lost = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows


def driver_on(pool: AsyncConnectionPool, store: Store, concurrency: int) -> Driver:
    """A worker's driver whose commits go through `store`."""
    config = DriverConfig(WORKER, concurrency, 30, DEFAULT_RETRY_POLICY, None)
    driver = Driver(pool, config, metrics=Metrics(), stopping=asyncio.Event(), log=structlog.get_logger())
    driver.store = driver.group_commit.store = store
    return driver


def assignment_of(row: ClaimedWorkflow) -> Assignment:
    """The assignment a worker makes of a claimed row of THREE, at its first step."""
    decision = decide(row, THREE)
    assert isinstance(decision, Run)
    return Assignment(row, THREE, decision.input, 0, row.attempt or 1, 0, time.monotonic() + 30, {}, "d")


async def test_a_commit_whose_answer_was_lost_is_settled_from_the_rows(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    insert_workflow(db, type="three", input={"n": 1})
    row = await claim_one(Store(pool))
    driver = driver_on(pool, AnswerLostOnce(pool, size=1), concurrency=1)
    assignment = assignment_of(row)
    go_on = await driver._record(assignment, StepSucceeded({"one": 1}, json.dumps({"one": 1})))
    # The first try landed and went on; its retry found nothing to fence on, and the
    # driver followed the workflow to its next step instead of calling the lease lost.
    assert go_on is True
    assert (assignment.step_index, assignment.attempt) == (1, 1)
    assert db.execute(
        "SELECT step_index, state::text FROM workflow_steps WHERE workflow_id = %s ORDER BY step_index",
        (row.id,),
    ).fetchall() == [(0, "completed"), (1, "running"), (2, "pending")]
    assert db.execute(
        "SELECT count(*) FROM workflow_events WHERE workflow_id = %s AND to_state = 'completed'", (row.id,)
    ).fetchone() == (1,)
    driver.close()


async def test_a_batch_whose_answer_was_lost_is_settled_member_by_member(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    for n in range(3):
        insert_workflow(db, type="three", input={"n": n})
    store = AnswerLostOnce(pool, size=2)
    rows = [await claim_one(store) for _ in range(3)]
    driver = driver_on(pool, store, concurrency=3)
    assignments = [assignment_of(row) for row in rows]
    outcome = StepSucceeded({}, "{}")
    # The first commits alone; the other two share a batch, which lands and loses its answer.
    went_on = await asyncio.gather(*(driver._record(a, outcome) for a in assignments))
    assert store.lost
    assert went_on == [True, True, True]
    assert [a.step_index for a in assignments] == [1, 1, 1]
    assert db.execute(
        "SELECT count(*) FROM workflow_steps WHERE step_index = 1 AND state = 'running'"
    ).fetchone() == (3,)
    driver.close()
