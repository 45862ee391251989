"""Rules the SQL and the Python both need, defined once on each side and proven equal:
the runnable states, the wake-up channel, the step key; and the start of a step, shared
by the queries as a part, against the one place that cannot include it."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from daemon.wakeup import CHANNEL
from engine import Step, Workflow
from engine.idempotency import step_key
from engine.registry import served_key
from engine.sqlfiles import parts, queries
from engine.states import FINISHED_WORKFLOW_STATES, RUNNABLE_WORKFLOW_STATES
from engine.store import StepDefinitions, Store
from tests.factories import insert_workflow

# A workflow's state (bare `state`; a step's is `s.state`) compared with a list.
STATE_LIST = re.compile(r"(?<![.\w])state IN \(([^)]*)\)")


# Another rule: a workflow can be cancelled while pending or running.
CANCELLABLE_ONLY = {"cancel_workflow"}

STEP_COLUMNS = (
    "SELECT state::text, attempt, compensation_attempt, retry_count, compensation_retry_count,"
    " next_retry_at, started_at IS NOT NULL FROM workflow_steps"
)


async def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


def _states(listed: str) -> frozenset[str]:
    return frozenset(re.findall(r"'(\w+)'", listed))


def test_every_query_asking_for_due_work_lists_the_runnable_states(db: psycopg.Connection[Any]) -> None:
    runnable = frozenset(str(state) for state in RUNNABLE_WORKFLOW_STATES)
    lists = [
        (name, _states(match))
        for name, text in queries().items()
        for match in STATE_LIST.findall(text)
        if "pending" in match and name not in CANCELLABLE_ONLY
    ]
    assert {name for name, _ in lists} >= {
        "claim_due_workflows",
        "recent_outcomes",
        "unserved_work",
        "queue_depth",
    }
    assert all(states == runnable for _, states in lists), lists
    (predicate,) = db.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = 'workflows_due_idx'::regclass"
    ).fetchone()  # type: ignore[misc]
    assert _states(predicate) == runnable


def test_the_counts_of_finished_workflows_list_the_finished_states() -> None:
    # The recount and the count of what finished since must cover the same states.
    finished = frozenset(str(state) for state in FINISHED_WORKFLOW_STATES)
    for name in ("recount_finished", "count_all_by_type_and_state"):
        (listed,) = re.findall(r"state IN \(([^)]*'completed'[^)]*)\)", queries()[name])
        assert _states(listed) == finished, name


def test_the_daemons_listen_where_the_database_wakes_them(db: psycopg.Connection[Any]) -> None:
    (wake,) = db.execute("SELECT pg_get_functiondef('workflow_wake'::regproc)").fetchone()  # type: ignore[misc]
    assert f"pg_notify('{CHANNEL}'" in wake
    (trigger,) = db.execute("SELECT pg_get_functiondef('workflows_notify_insert'::regproc)").fetchone()  # type: ignore[misc]
    assert "workflow_wake()" in trigger
    assert queries()["notify_due"] == "SELECT workflow_wake()"


def test_the_step_key_is_the_same_rule_in_sql_and_python(db: psycopg.Connection[Any]) -> None:
    assert db.execute("SELECT workflow_step_key('charge', 'abc')").fetchone() == (step_key("charge", "abc"),)
    assert "workflow_step_key(d.step_name, f.digest)" in queries()["create_steps"]


async def test_a_fresh_step_is_inserted_as_start_step_makes_it(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """create_steps cannot UPDATE the rows it inserts, so it writes step 0 already
    started; that row must be the one start_step makes of a pending step."""
    workflow = Workflow(type="two_steps", steps=[Step("first", _noop), Step("second", _noop)])
    insert_workflow(db, type="two_steps", input={})
    async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
        store = Store(pool)
        async with store.claiming_transaction() as tx:
            (row,) = await tx.claim_due_workflows(
                worker_id="w",
                served=["two_steps"],
                limit=1,
                lease_seconds=30,
                busy=[],
                definitions=StepDefinitions.of([workflow]),
            )
            await tx.create_steps(
                worker_id="w",
                digests={row.id: "d"},
                definitions=StepDefinitions.of([workflow]),
            )
    started = db.execute(STEP_COLUMNS + " WHERE workflow_id = %s AND step_index = 0", (row.id,)).fetchone()
    # The same step as it was before its start: pending, no attempt yet.
    db.execute(
        "UPDATE workflow_steps SET state = 'pending', attempt = 0, started_at = NULL WHERE workflow_id = %s",
        (row.id,),
    )
    db.execute(
        "UPDATE workflow_steps s SET " + parts()["start_step"] + " FROM (SELECT false AS compensating) go"
        " WHERE s.workflow_id = %s AND s.step_index = 0",
        (row.id,),
    )
    assert (
        db.execute(STEP_COLUMNS + " WHERE workflow_id = %s AND step_index = 0", (row.id,)).fetchone()
        == started
    )


def test_the_served_key_is_the_same_rule_in_sql_and_python(db: psycopg.Connection[Any]) -> None:
    for workflow_type, version in (("payout", None), ("payout", 3)):
        row = db.execute("SELECT workflow_served_key(%s, %s::int)", (workflow_type, version)).fetchone()
        assert row == (served_key(workflow_type, version),)
    assert (
        "workflow_served_key(type, workflow_run_version(version, started_at)) = ANY(%(served)s::text[])"
        in (queries()["claim_due_workflows"])
    )


def test_a_workflow_the_release_before_versions_started_runs_version_1(db: psycopg.Connection[Any]) -> None:
    run_version = "SELECT workflow_run_version(%s::int, %s::timestamptz)"
    assert db.execute(run_version, (3, None)).fetchone() == (3,)
    assert db.execute(run_version, (None, None)).fetchone() == (None,)  # not claimed yet
    assert db.execute(run_version, (None, "2026-01-01")).fetchone() == (1,)  # claimed, unrecorded
