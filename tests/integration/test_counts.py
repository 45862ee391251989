"""The counts of stats (engine/counts.py): exact for every state without a count of the
whole table on each call, against a real database."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg

from engine import WorkflowService
from engine.counts import COUNTS_LOCK_ID, recount_finished
from engine.retention import RetentionPolicy, prune
from engine.sqlfiles import query
from tests.factories import insert_workflow


def stage(db: psycopg.Connection[Any], workflow_type: str, state: str, *, finished_ago: str | None) -> str:
    """A workflow of `workflow_type` in `state`, finished `finished_ago` (an interval) ago."""
    row = insert_workflow(db, type=workflow_type, state=state)
    if finished_ago is not None:
        db.execute(
            "UPDATE workflows SET completed_at = now() - %s::interval WHERE id = %s",
            (finished_ago, row["id"]),
        )
    return str(row["id"])


def truth(db: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    """What a full count of the table says."""
    counted: dict[str, dict[str, int]] = {}
    for workflow_type, state, count in db.execute(
        "SELECT type, state::text, count(*) FROM workflows GROUP BY 1, 2"
    ):
        counted.setdefault(workflow_type, {})[state] = count
    return counted


def counted_at(db: psycopg.Connection[Any]) -> Any:
    row = db.execute("SELECT counted_at FROM workflow_finished_counts").fetchone()
    return None if row is None else row[0]


async def test_stats_count_every_state_exactly_before_and_after_a_recount(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    for state, finished_ago in [("completed", "2 days"), ("failed", "3 hours"), ("cancelled", "1 day"),
                                ("compensated", "10 minutes"), ("pending", None), ("running", None)]:  # fmt: skip
        stage(db, "trade", state, finished_ago=finished_ago)
        stage(db, "index", state, finished_ago=finished_ago)
    assert counted_at(db) is None

    first = await service.get_stats()  # no recount yet: this reader makes one
    assert first.by_type == truth(db)
    recounted = counted_at(db)
    assert recounted is not None

    for state, finished_ago in [("completed", "0 seconds"), ("failed", "0 seconds"), ("completed", "30 seconds"),
                                ("pending", None), ("compensating", None)]:  # fmt: skip
        stage(db, "trade", state, finished_ago=finished_ago)
    later = await service.get_stats()  # what finished since the recount, counted exactly
    assert later.by_type == truth(db)
    assert later.by_state == dict(sum((Counter(states) for states in truth(db).values()), Counter()))
    assert counted_at(db) == recounted  # ... without another recount


async def test_a_workflow_finishing_across_a_recount_is_counted_once(
    service: WorkflowService, db: psycopg.Connection[Any], db_url: str
) -> None:
    # completed_at is the start of the finishing transaction, which may commit after the
    # recount looked: the recount's margin leaves it to the count of what finished since.
    workflow_id = stage(db, "trade", "running", finished_ago=None)
    with psycopg.connect(db_url) as finishing:
        finishing.execute("SELECT now()")  # the transaction starts here
        assert await recount_finished(service.store, older_than=0)
        finishing.execute(
            "UPDATE workflows SET state = 'completed', completed_at = now() WHERE id = %s", (workflow_id,)
        )
        finishing.commit()
    assert (await service.get_stats()).by_type == {"trade": {"completed": 1}}


async def test_one_process_recounts_at_a_time_and_only_an_old_count(
    service: WorkflowService, db: psycopg.Connection[Any], db_url: str
) -> None:
    stage(db, "trade", "completed", finished_ago="1 hour")
    with psycopg.connect(db_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (COUNTS_LOCK_ID,))
        assert not await recount_finished(service.store, older_than=0)
    assert await recount_finished(service.store, older_than=0)
    assert not await recount_finished(service.store, older_than=60)  # counted a moment ago
    assert await recount_finished(service.store, older_than=0)


async def test_a_prune_recounts_so_stats_drop_what_went(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    for _ in range(3):
        stage(db, "trade", "completed", finished_ago="40 days")
    stage(db, "trade", "completed", finished_ago="1 day")
    assert (await service.get_stats()).by_type == {"trade": {"completed": 4}}
    pruned = await prune(service.store, RetentionPolicy.from_days(30, 90))
    assert pruned.removed["completed"] == 3
    assert (await service.get_stats()).by_type == {"trade": {"completed": 1}}


def test_the_count_reads_only_what_finished_since_the_recount(db: psycopg.Connection[Any]) -> None:
    # 20,000 finished workflows and a runnable one, analyzed: under its pins the stats'
    # count finds the runnable ones and those finished since the recount through indexes,
    # the latter bounded by the recount's time.
    db.execute(
        "INSERT INTO workflows (type, input, state, completed_at) "
        "SELECT 'bulk', jsonb_build_object('n', n), 'completed', now() - interval '1 day' "
        "FROM generate_series(1, 20000) n"
    )
    stage(db, "bulk", "pending", finished_ago=None)
    db.execute(query("recount_finished"), {"margin_seconds": 60})
    db.execute("ANALYZE workflows")
    with db.transaction():
        db.execute(query("pin_counting_plans"))
        plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + query("count_all_by_type_and_state")))
        counted = [tuple(row) for row in db.execute(query("count_all_by_type_and_state"))]
    assert "Seq Scan on workflows" not in plan, plan
    assert (
        "Index Cond: ((state = ANY ('{completed,failed,cancelled,compensated}'::workflow_state[])) AND (completed_at > "
        in plan
    ), plan
    assert counted == [("bulk", "completed", 20000), ("bulk", "pending", 1)]
