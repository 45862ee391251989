"""Group commit on a real database: the completions of many workflows in few statements,
each still fenced by its own lease token, and a failed batch tried again member by member."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from daemon.group_commit import GroupCommit
from engine import Step, Workflow
from engine.attempts import ClaimedWorkflow
from engine.store import Advanced, Completion, StepDefinitions, Store
from tests.factories import insert_workflow

WORKER = "worker-a"


async def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


ONE_STEP = Workflow(type="one_step", steps=[Step("only", _noop)])
TWO_STEPS = Workflow(type="two_steps", steps=[Step("first", _noop), Step("second", _noop)])


class CountingStore(Store):
    """The real store, remembering the size of every complete_steps batch."""

    batches: list[int]

    async def complete_steps(
        self, completions: Sequence[Completion], *, worker_id: str
    ) -> dict[Any, Advanced]:
        self.batches.append(len(completions))
        return await super().complete_steps(completions, worker_id=worker_id)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[CountingStore]:
    async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
        counting = CountingStore(pool)
        counting.batches = []
        yield counting


async def claim(store: Store, workflow: Workflow, count: int) -> list[ClaimedWorkflow]:
    async with store.claiming_transaction() as tx:
        rows = await tx.claim_due_workflows(
            worker_id=WORKER,
            served=[workflow.type],
            limit=count,
            lease_seconds=30,
            busy=[],
            definitions=StepDefinitions.of([workflow]),
        )
        digests = {row.id: f"digest-{row.id}" for row in rows}
        await tx.create_steps(
            worker_id=WORKER,
            digests=digests,
            definitions=StepDefinitions.of([workflow]),
        )
    assert len(rows) == count
    return rows


def completion(row: ClaimedWorkflow, output: Any, *, step_index: int = 0, attempt: int = 1) -> Completion:
    return Completion(row.id, row.lease_token, step_index, attempt, json.dumps(output), go_on=True)


async def test_concurrent_completions_share_a_statement_and_a_lost_lease_drops_only_its_own(
    store: CountingStore, db: psycopg.Connection[Any]
) -> None:
    for n in range(20):
        insert_workflow(db, type="one_step", input={"n": n})
    rows = await claim(store, ONE_STEP, 20)
    victim = rows[7]
    db.execute("UPDATE workflows SET lease_token = gen_random_uuid() WHERE id = %s", (victim.id,))
    group = GroupCommit(store, worker_id=WORKER)

    answers = await asyncio.gather(*(group.complete(completion(row, {"n": i})) for i, row in enumerate(rows)))

    # The first completion commits alone; the others gathered meanwhile and share one.
    assert store.batches == [1, 19]
    assert answers[7] is None
    assert all(answer is not None and answer.was_last for i, answer in enumerate(answers) if i != 7)
    states = dict(db.execute("SELECT id, state::text FROM workflows").fetchall())
    assert states.pop(victim.id) == "running"
    assert set(states.values()) == {"completed"}
    assert db.execute(
        "SELECT state::text, output FROM workflow_steps WHERE workflow_id = %s", (victim.id,)
    ).fetchone() == ("running", None)
    assert db.execute(
        "SELECT count(*) FROM workflow_events WHERE workflow_id = %s AND to_state = 'completed'",
        (victim.id,),
    ).fetchone() == (0,)
    assert db.execute("SELECT output FROM workflows WHERE id = %s", (rows[3].id,)).fetchone() == ({"n": 3},)


async def test_a_completion_that_goes_on_starts_the_next_step_under_the_same_lease(
    store: CountingStore, db: psycopg.Connection[Any]
) -> None:
    insert_workflow(db, type="two_steps")
    (row,) = await claim(store, TWO_STEPS, 1)
    lease_before = db.execute(
        "SELECT lease_token, lease_expires_at, next_retry_at FROM workflows WHERE id = %s", (row.id,)
    ).fetchone()

    answer = await GroupCommit(store, worker_id=WORKER).complete(completion(row, {"a": 1}))

    assert answer is not None
    assert (answer.was_last, answer.next_step_index, answer.next_attempt) == (False, 1, 1)
    assert (
        db.execute(
            "SELECT lease_token, lease_expires_at, next_retry_at FROM workflows WHERE id = %s", (row.id,)
        ).fetchone()
        == lease_before
    )
    assert db.execute(
        "SELECT step_index, state::text FROM workflow_steps WHERE workflow_id = %s ORDER BY step_index",
        (row.id,),
    ).fetchall() == [(0, "completed"), (1, "running")]


async def test_a_failed_batch_is_retried_member_by_member_so_only_the_locked_row_fails(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    pool = AsyncConnectionPool(
        db_url, kwargs={"autocommit": True, "options": "-c lock_timeout=200"}, open=False
    )
    async with pool:
        store = CountingStore(pool)
        store.batches = []
        for n in range(3):
            insert_workflow(db, type="one_step", input={"n": n})
        rows = await claim(store, ONE_STEP, 3)
        group = GroupCommit(store, worker_id=WORKER)
        with psycopg.connect(db_url) as blocker:  # holds a row lock until it rolls back
            blocker.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (rows[1].id,))
            answers = await asyncio.gather(
                *(group.complete(completion(row, {})) for row in rows), return_exceptions=True
            )
            # The first committed alone; the other two shared a statement that waited for
            # the lock past lock_timeout. Tried again one by one, the unlocked row commits
            # and only the locked one fails, with the error the driver retries.
            assert store.batches == [1, 2, 1, 1]
            assert isinstance(answers[0], Advanced)
            assert isinstance(answers[1], psycopg.errors.LockNotAvailable)
            assert isinstance(answers[1], psycopg.OperationalError)
            assert isinstance(answers[2], Advanced)
            assert db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone() == (2,)
            blocker.rollback()
        retried = await group.complete(completion(rows[1], {}))
        assert retried is not None
        assert db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone() == (3,)


async def test_a_completion_under_an_expired_lease_lands_but_does_not_go_on(
    store: CountingStore, db: psycopg.Connection[Any]
) -> None:
    insert_workflow(db, type="two_steps")
    (row,) = await claim(store, TWO_STEPS, 1)
    # Nobody has taken the lease over, but it has run out: another worker may claim the
    # workflow any moment, and must not find the next step already running.
    db.execute("UPDATE workflows SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (row.id,))

    answer = await GroupCommit(store, worker_id=WORKER).complete(completion(row, {"a": 1}))

    assert answer is not None
    assert answer.next_step_index is None
    assert db.execute(
        "SELECT current_step_index, lease_token, next_retry_at <= now() FROM workflows WHERE id = %s",
        (row.id,),
    ).fetchone() == (1, None, True)
    assert db.execute(
        "SELECT step_index, state::text FROM workflow_steps WHERE workflow_id = %s ORDER BY step_index",
        (row.id,),
    ).fetchall() == [(0, "completed"), (1, "pending")]


async def test_the_heartbeat_never_waits_for_a_locked_row(
    store: CountingStore, db_url: str, db: psycopg.Connection[Any]
) -> None:
    for n in range(2):
        insert_workflow(db, type="one_step", input={"n": n})
    locked, free = await claim(store, ONE_STEP, 2)
    leases = {locked.id: locked.lease_token, free.id: free.lease_token}
    with psycopg.connect(db_url) as blocker:  # holds a row lock, as a commit in flight would
        blocker.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (locked.id,))
        renewals = await asyncio.wait_for(
            store.renew_leases(worker_id=WORKER, leases=leases, lease_seconds=30), timeout=2
        )
        blocker.rollback()
    assert renewals[free.id].renewed
    assert not renewals[locked.id].renewed  # skipped, still ours: renewed at the next beat
    db.execute("UPDATE workflows SET lease_token = gen_random_uuid() WHERE id = %s", (free.id,))
    lost = await store.renew_leases(worker_id=WORKER, leases=leases, lease_seconds=30)
    assert set(lost) == {locked.id}
