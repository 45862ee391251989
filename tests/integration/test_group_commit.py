"""Group commit on a real database: the completions of many workflows in few statements,
each still fenced by its own lease token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from daemon.group_commit import GroupCommit
from engine import Step, Workflow
from engine.store import Completion, Row, StepDefinitions, Store
from tests.factories import insert_workflow

WORKER = "worker-a"


async def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


ONE_STEP = Workflow(type="one_step", steps=[Step("only", _noop)])
TWO_STEPS = Workflow(type="two_steps", steps=[Step("first", _noop), Step("second", _noop)])


class CountingStore(Store):
    """The real store, remembering the size of every complete_steps batch."""

    batches: list[int]

    async def complete_steps(self, completions: Sequence[Completion], *, worker_id: str) -> dict[Any, Row]:
        self.batches.append(len(completions))
        return await super().complete_steps(completions, worker_id=worker_id)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[CountingStore]:
    async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
        counting = CountingStore(pool)
        counting.batches = []
        yield counting


async def claim(store: Store, workflow: Workflow, count: int) -> list[Row]:
    async with store.claiming_transaction() as tx:
        rows = await tx.claim_due_workflows(
            worker_id=WORKER, types=[workflow.type], limit=count, lease_seconds=30
        )
        digests = {row["id"]: f"digest-{row['id']}" for row in rows}
        await tx.create_steps(worker_id=WORKER, digests=digests, definitions=StepDefinitions.of([workflow]))
    assert len(rows) == count
    return rows


def completion(row: Row, output: Any, *, step_index: int = 0, attempt: int = 1) -> Completion:
    return Completion(row["id"], row["lease_token"], step_index, attempt, output, go_on=True)


async def test_concurrent_completions_share_a_statement_and_a_lost_lease_drops_only_its_own(
    store: CountingStore, db: psycopg.Connection[Any]
) -> None:
    for n in range(20):
        insert_workflow(db, type="one_step", input={"n": n})
    rows = await claim(store, ONE_STEP, 20)
    victim = rows[7]
    db.execute("UPDATE workflows SET lease_token = gen_random_uuid() WHERE id = %s", (victim["id"],))
    group = GroupCommit(store, worker_id=WORKER)

    answers = await asyncio.gather(*(group.complete(completion(row, {"n": i})) for i, row in enumerate(rows)))

    # The first completion commits alone; the others gathered meanwhile and share one.
    assert store.batches == [1, 19]
    assert answers[7] is None
    assert all(answer is not None and answer["was_last"] for i, answer in enumerate(answers) if i != 7)
    states = dict(db.execute("SELECT id, state::text FROM workflows").fetchall())
    assert states.pop(victim["id"]) == "running"
    assert set(states.values()) == {"completed"}
    assert db.execute(
        "SELECT state::text, output FROM workflow_steps WHERE workflow_id = %s", (victim["id"],)
    ).fetchone() == ("running", None)
    assert db.execute(
        "SELECT count(*) FROM workflow_events WHERE workflow_id = %s AND to_state = 'completed'",
        (victim["id"],),
    ).fetchone() == (0,)
    assert db.execute("SELECT output FROM workflows WHERE id = %s", (rows[3]["id"],)).fetchone() == (
        {"n": 3},
    )


async def test_a_completion_that_goes_on_starts_the_next_step_under_the_same_lease(
    store: CountingStore, db: psycopg.Connection[Any]
) -> None:
    insert_workflow(db, type="two_steps")
    (row,) = await claim(store, TWO_STEPS, 1)
    lease_before = db.execute(
        "SELECT lease_token, lease_expires_at, next_retry_at FROM workflows WHERE id = %s", (row["id"],)
    ).fetchone()

    answer = await GroupCommit(store, worker_id=WORKER).complete(completion(row, {"a": 1}))

    assert answer is not None
    assert (answer["was_last"], answer["next_step_index"], answer["next_attempt"]) == (False, 1, 1)
    assert (
        db.execute(
            "SELECT lease_token, lease_expires_at, next_retry_at FROM workflows WHERE id = %s", (row["id"],)
        ).fetchone()
        == lease_before
    )
    assert db.execute(
        "SELECT step_index, state::text FROM workflow_steps WHERE workflow_id = %s ORDER BY step_index",
        (row["id"],),
    ).fetchall() == [(0, "completed"), (1, "running")]


async def test_a_database_error_fails_its_whole_batch_and_the_retries_commit(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    pool = AsyncConnectionPool(
        db_url, kwargs={"autocommit": True, "options": "-c lock_timeout=200"}, open=False
    )
    async with pool:
        store = Store(pool)
        for n in range(3):
            insert_workflow(db, type="one_step", input={"n": n})
        rows = await claim(store, ONE_STEP, 3)
        group = GroupCommit(store, worker_id=WORKER)
        with psycopg.connect(db_url) as blocker:  # holds a row lock until it rolls back
            blocker.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (rows[1]["id"],))
            answers = await asyncio.gather(
                *(group.complete(completion(row, {})) for row in rows), return_exceptions=True
            )
            # The first committed alone; the other two shared a statement that waited
            # for the lock past lock_timeout: both fail, though only one row was locked.
            assert isinstance(answers[0], dict)
            assert [type(answer) for answer in answers[1:]] == [psycopg.errors.LockNotAvailable] * 2
            assert isinstance(answers[1], psycopg.OperationalError)  # what the driver retries
            assert db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone() == (1,)
            blocker.rollback()
        retried = await asyncio.gather(*(group.complete(completion(row, {})) for row in rows[1:]))
        assert all(answer is not None for answer in retried)
        assert db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone() == (3,)
