"""Rules the SQL and the Python both need, defined once on each side and proven equal:
the runnable states, the wake-up channel, the step key."""

from __future__ import annotations

import re
from typing import Any

import psycopg

from daemon.wakeup import CHANNEL
from engine.idempotency import step_key
from engine.sqlfiles import queries
from engine.states import RUNNABLE_WORKFLOW_STATES

# A workflow's state (bare `state`; a step's is `s.state`) compared with a list.
STATE_LIST = re.compile(r"(?<![.\w])state IN \(([^)]*)\)")


# Another rule: a workflow can be cancelled while pending or running.
CANCELLABLE_ONLY = {"cancel_workflow"}


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
        "unserved_types",
        "queue_depth",
    }
    assert all(states == runnable for _, states in lists), lists
    (predicate,) = db.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = 'workflows_due_idx'::regclass"
    ).fetchone()  # type: ignore[misc]
    assert _states(predicate) == runnable


def test_the_daemons_listen_where_the_database_wakes_them(db: psycopg.Connection[Any]) -> None:
    (wake,) = db.execute("SELECT pg_get_functiondef('workflow_wake'::regproc)").fetchone()  # type: ignore[misc]
    assert f"pg_notify('{CHANNEL}'" in wake
    (trigger,) = db.execute("SELECT pg_get_functiondef('workflows_notify_insert'::regproc)").fetchone()  # type: ignore[misc]
    assert "workflow_wake()" in trigger
    assert queries()["notify_due"].endswith("\nSELECT workflow_wake()")


def test_the_step_key_is_the_same_rule_in_sql_and_python(db: psycopg.Connection[Any]) -> None:
    assert db.execute("SELECT workflow_step_key('charge', 'abc')").fetchone() == (step_key("charge", "abc"),)
    assert "workflow_step_key(d.step_name, f.digest)" in queries()["create_steps"]
