"""engine.Snooze: a step says "not yet"; its workflow waits without a lease or a worker
slot, spends no retry (the types here allow none), counts the attempt, says so in the
timeline, and survives kill -9 of the daemon that snoozed it."""

from __future__ import annotations

import os
import signal
from typing import Any

import psycopg

from tests.e2e.conftest import Daemons, insert_workflows, states, wait_until


def one(db: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = db.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def snoozes(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT error FROM workflow_events WHERE from_state = 'running' AND to_state = 'pending' ORDER BY id"
    ).fetchall()
    return [error for (error,) in rows]


def test_a_snooze_frees_the_slot_spends_no_retry_and_is_in_the_timeline(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start(concurrency=1)
    insert_workflows(db, "snoozing", 1, snoozes=3, every=1.5)
    wait_until(lambda: len(snoozes(db)) == 1, 20, "the first snooze")
    # Parked: no lease, due when the snooze ends; the one slot is free for other work.
    lease, waiting = one(db, "SELECT locked_by IS NULL AND lease_token IS NULL, state::text FROM workflows")
    assert (lease, waiting) == (True, "running")
    assert one(db, "SELECT state::text FROM workflow_steps WHERE step_name = 'wait'") == "pending"
    insert_workflows(db, "three_steps", 1)
    wait_until(lambda: states(db).get("completed") == 1, 10, "other work in the free slot")
    assert one(db, "SELECT state::text FROM workflows WHERE type = 'snoozing'") == "running"

    wait_until(lambda: states(db) == {"completed": 2}, 30, "the snoozing workflow to finish")
    attempt, retries, output = one(
        db, "SELECT attempt, retry_count, output FROM workflow_steps WHERE step_name = 'wait'"
    )
    assert (attempt, retries, output) == (4, 0, {"settled_at_attempt": 4})
    assert one(db, "SELECT retry_count FROM workflows WHERE type = 'snoozing'") == 0
    assert one(db, "SELECT count(*) FROM test_effects WHERE step_name = 'wait'") == 4
    recorded = snoozes(db)
    assert [event["type"] for event in recorded] == ["Snoozed"] * 3
    assert recorded[0]["message"] == "not settled yet (check 1)"
    assert all("until" in event for event in recorded)


def test_a_returned_snooze_and_a_transactional_one_roll_nothing_forward(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "snoozing_plain", 1, snoozes=2)
    insert_workflows(db, "snoozing_ledger", 1, snoozes=2)
    wait_until(lambda: states(db) == {"completed": 2}, 30, "both to finish")
    outputs = dict(db.execute("SELECT type, output FROM workflows").fetchall())
    assert outputs == {
        "snoozing_plain": {"settled_at_attempt": 3},
        "snoozing_ledger": {"settled_at_attempt": 3},
    }
    # The snoozed attempts' writes rolled back with them: one booking, the last attempt's.
    assert db.execute("SELECT amount FROM test_ledger").fetchall() == [(3,)]


def test_a_snoozed_workflow_survives_kill_9_of_its_daemon(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    first = daemons.start()
    insert_workflows(db, "snoozing", 5, snoozes=1, every=2)
    wait_until(lambda: len(snoozes(db)) == 5, 20, "every workflow to snooze")
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    daemons.start()
    wait_until(lambda: states(db) == {"completed": 5}, 30, "the snoozed workflows to finish elsewhere")
    # Each ran its first step once and its waiting step twice (a snooze, then done).
    counts = db.execute(
        "SELECT step_name, count(*) FROM test_effects GROUP BY step_name ORDER BY 1"
    ).fetchall()
    assert counts == [("after", 5), ("before", 5), ("wait", 10)]
    assert one(db, "SELECT max(retry_count) FROM workflow_steps") == 0
