"""Flow keys against a real database (migration 0019): a row carries a key, and sits in
the limited claim's index, only while its type is flow-controlled. When a type's limits
change, the rekey gives its unfinished rows their new key, including the row of a
writer that read the old rule and committed after the first pass."""

from __future__ import annotations

from typing import Any

import psycopg

from engine import Registry, Step, Workflow, WorkflowService, flow
from engine.store import StepDefinitions
from tests.factories import insert_workflow
from tests.integration.test_fairness import declare as declare_fair


def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


LATE = Workflow(type="late", steps=[Step("only", _noop)])


def keys(db: psycopg.Connection[Any], workflow_type: str) -> list[int | None]:
    rows = db.execute(
        "SELECT fair_key FROM workflows WHERE type = %s ORDER BY created_at, id", (workflow_type,)
    )
    return [row[0] for row in rows]


def requests(db: psycopg.Connection[Any]) -> list[tuple[str, bool]]:
    return db.execute("SELECT type, first_pass_done FROM workflow_flow_rekeys ORDER BY type").fetchall()


def queue(db: psycopg.Connection[Any], workflow_type: str, count: int) -> None:
    db.execute(
        "INSERT INTO workflows (type, input, user_id) SELECT %s, jsonb_build_object('n', n), 'user-' || n %% 3 "
        "FROM generate_series(1, %s) n",
        (workflow_type, count),
    )


async def claim(service: WorkflowService, room: int) -> int:
    await service.store.provide_slots(["late"])  # as a worker does when it reads the limits
    async with service.store.claiming_transaction() as tx:
        limits = await tx.load_limits(["late"])
        rows = await flow.claim_limited(
            tx, limits=limits, worker_id="w", served=Registry([LATE]).served, busy=[], room=room,
            lease_seconds=30, definitions=StepDefinitions.of([LATE]),
        )  # fmt: skip
    return len(rows)


async def test_a_limit_set_at_run_time_keys_the_rows_queued_before_it_and_a_reset_unkeys_them(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    queue(db, "late", 25)
    assert set(keys(db, "late")) == {None}  # no flow control: not in the limited claim's index
    await service.set_limit("late", 5, actor="ops")
    assert requests(db) == [("late", False)]

    assert await flow.rekey(service.store) == 25
    assert set(keys(db, "late")) == {0}
    assert requests(db) == []  # both passes done
    assert await claim(service, 10) == 5  # the old rows are found, within the limit

    await service.reset_limit("late")
    assert await flow.rekey(service.store) == 25
    assert set(keys(db, "late")) == {None}
    assert await flow.rekey(service.store) == 0


async def test_a_row_written_under_the_old_rule_and_committed_after_the_first_pass_gets_its_key(
    service: WorkflowService, db: psycopg.Connection[Any], db_url: str
) -> None:
    queue(db, "late", 3)
    with psycopg.connect(db_url) as writer:  # a transaction left open across the change
        writer.execute("INSERT INTO workflows (type, input) VALUES ('late', '{\"n\": \"racer\"}')")
        await service.set_limit("late", 5, actor="ops")
        assert await flow.rekey(service.store) == 3
        assert requests(db) == [("late", True)]  # the last pass waits for the writer
        assert await flow.rekey(service.store) == 0
        writer.commit()
    assert keys(db, "late").count(None) == 1
    assert await flow.rekey(service.store) == 1
    assert set(keys(db, "late")) == {0}
    assert requests(db) == []


async def test_a_finished_workflow_reopened_gets_the_key_its_type_has_now(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    failed = insert_workflow(db, type="late", state="failed", completed_at="now()")
    assert failed["fair_key"] is None
    await service.set_limit("late", 5, actor="ops")
    assert await flow.rekey(service.store) == 0  # finished rows keep theirs
    await service.retry_workflow(failed["id"], actor="ops")
    assert keys(db, "late") == [0]


async def test_a_type_made_fair_gets_its_users_keys(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    queue(db, "fair", 6)
    await service.set_limit("fair", 100, actor="ops")
    await flow.rekey(service.store)
    assert set(keys(db, "fair")) == {0}
    await declare_fair(service.store)  # its daemons now declare fair_by="user_id"
    assert await flow.rekey(service.store) == 6
    (users,) = db.execute(
        "SELECT count(DISTINCT fair_key) FROM workflows WHERE type = 'fair' AND fair_key = hashtext(user_id)"
    ).fetchone()  # type: ignore[misc]
    assert users == 3
