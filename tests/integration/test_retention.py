"""Retention: what `prune` (the CLI, and the engine's function the daemons call) deletes,
and what it never touches, against a real database."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from engine.retention import RetentionPolicy, prune
from engine.store import Store
from tests.factories import insert_step, insert_workflow
from tests.integration.test_cli import workflowd

HOUR = 3600
STATES = ("completed", "cancelled", "compensated", "failed", "pending", "running")


def staged_workflow(db: psycopg.Connection[Any], state: str, finished_seconds_ago: float | None) -> str:
    """A workflow in `state` with a step and a timeline row; `completed_at` that long ago."""
    completed_at = None if finished_seconds_ago is None else f"-{finished_seconds_ago} seconds"
    row = insert_workflow(db, state=state, total_steps=1)
    db.execute(
        "UPDATE workflows SET completed_at = now() + %s::interval WHERE id = %s", (completed_at, row["id"])
    )
    insert_step(db, row, 0, "only", state="completed")
    db.execute("INSERT INTO workflow_events (workflow_id, to_state) VALUES (%s, %s)", (row["id"], state))
    return str(row["id"])


def remaining(db: psycopg.Connection[Any]) -> set[str]:
    return {str(id) for (id,) in db.execute("SELECT id FROM workflows").fetchall()}


def orphans(db: psycopg.Connection[Any]) -> int:
    (count,) = db.execute(
        "SELECT (SELECT count(*) FROM workflow_steps s WHERE NOT EXISTS "
        "(SELECT 1 FROM workflows w WHERE w.id = s.workflow_id)) + (SELECT count(*) FROM workflow_events e "
        "WHERE NOT EXISTS (SELECT 1 FROM workflows w WHERE w.id = e.workflow_id))"
    ).fetchone()  # type: ignore[misc]
    return int(count)


def test_prune_removes_exactly_what_retention_says(db_url: str, db: psycopg.Connection[Any]) -> None:
    old = {state: staged_workflow(db, state, 2 * HOUR) for state in STATES}
    recent = {state: staged_workflow(db, state, 10) for state in STATES}
    never_finished = staged_workflow(db, "pending", None)
    db.execute(
        "INSERT INTO workflow_workers (id, host, pid, types, concurrency, last_seen_at, stopped_at) VALUES "
        "('gone', 'h', 1, '{t}', 1, now() - interval '8 days', now() - interval '8 days'), "
        "('silent', 'h', 2, '{t}', 1, now() - interval '8 days', NULL), "
        "('live', 'h', 3, '{t}', 1, now(), NULL)"
    )
    env = {"DATABASE_URL": db_url}
    an_hour = ("--older-than", str(HOUR), "--failed-older-than", str(24 * HOUR))

    dry = workflowd("prune", *an_hour, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["workflows"] == {
        "completed": 1,
        "cancelled": 1,
        "compensated": 1,
        "failed": 0,
    }
    assert len(remaining(db)) == 2 * len(STATES) + 1  # a dry run deletes nothing

    done = workflowd("prune", *an_hour, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "removed 3 finished workflows with their steps and timeline "
        "(1 completed, 1 cancelled, 1 compensated, 0 failed) and 2 worker rows\n"
    )
    gone = {old["completed"], old["cancelled"], old["compensated"]}
    assert remaining(db) == ({*old.values(), *recent.values(), never_finished} - gone)
    assert orphans(db) == 0
    assert db.execute("SELECT id FROM workflow_workers").fetchall() == [("live",)]

    # Failed workflows wait for an operator: they go after their own, longer retention.
    failed = json.loads(workflowd("prune", "--older-than", str(HOUR), "--failed-older-than", str(HOUR),
                                  "--json", env=env).stdout)  # fmt: skip
    assert failed["workflows"]["failed"] == 1
    assert old["failed"] not in remaining(db)
    # Whatever the age given, never a workflow that is not finished.
    workflowd("prune", "--older-than", "0", "--failed-older-than", "0", env=env)
    left = db.execute("SELECT state::text FROM workflows ORDER BY 1").fetchall()
    assert left == [("pending",), ("pending",), ("pending",), ("running",), ("running",)]


def test_retention_of_zero_days_keeps_them_for_ever(db_url: str, db: psycopg.Connection[Any]) -> None:
    kept = staged_workflow(db, "completed", 400 * 24 * HOUR)
    env = {"DATABASE_URL": db_url, "WORKFLOWD_RETENTION_DAYS": "0", "WORKFLOWD_FAILED_RETENTION_DAYS": "0"}
    result = workflowd("prune", env=env)
    assert result.returncode == 0, result.stderr
    assert "kept: completed, cancelled, compensated for ever; failed for ever" in result.stdout
    assert remaining(db) == {kept}


async def test_prune_goes_in_batches_and_yields_to_another_pruner(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(
        "INSERT INTO workflows (type, input, state, completed_at) "
        "SELECT 't', jsonb_build_object('n', n), 'completed', now() - interval '2 days' "
        "FROM generate_series(1, 1200) n"
    )
    policy = RetentionPolicy(finished_seconds=HOUR, failed_seconds=None)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        # Another process holds the retention lock: this one deletes nothing and says so.
        with psycopg.connect(db_url) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (int.from_bytes(b"wfprune!", "big"),))
            yielded = await prune(Store(conn), policy, batch=500)
        assert (yielded.busy, yielded.removed.total()) == (True, 0)
        pruned = await prune(Store(conn), policy, batch=500)
    assert (pruned.busy, pruned.removed["completed"]) == (False, 1200)
    assert remaining(db) == set()


@pytest.mark.parametrize("value", ["-1", "abc", "inf"])
def test_a_bad_age_is_one_line(db_url: str, value: str) -> None:
    result = workflowd("prune", "--older-than", value, env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert f"argument --older-than: '{value}' is not a number of seconds (0 or more)" in result.stderr
    assert "Traceback" not in result.stderr
