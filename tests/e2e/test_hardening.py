"""No row, output, timeout or crashing step stops the queue or breaks a promise.

Each test here reproduces a way the engine once broke (one bad row stopping every
claim, one output failing a whole group commit, a non-idempotent step run again after a
timeout, a step that kills its process retried forever) against real daemons.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg
import pytest

from tests.e2e.conftest import Daemon, Daemons, all_finished, insert_workflows, states, wait_until


def effects(db: psycopg.Connection[Any], step_name: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT attempt, at FROM test_effects WHERE step_name = %s ORDER BY at", (step_name,)
    ).fetchall()


def error_of(db: psycopg.Connection[Any], workflow_id: Any) -> dict[str, Any]:
    row = db.execute("SELECT state::text, error FROM workflows WHERE id = %s", (workflow_id,)).fetchone()
    assert row is not None
    assert row[0] == "failed", row
    return dict(row[1])


def insert_row(db: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = db.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def claim_crashes(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event", "").endswith("_crashed")]


def rejections(daemon: Daemon) -> dict[str, float]:
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    prefix = "workflowd_claim_rejections_total{reason="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_bad_rows_mixed_into_good_traffic_fail_alone_and_the_rest_completes(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    bad = {
        # A number Python's int parsing refuses (more than 4,300 digits).
        "UnreadableInput": [
            insert_row(db, "INSERT INTO workflows (type, input) VALUES ('three_steps', "
                           "jsonb_build_object('n', ('1' || repeat('0', 5000))::numeric)) RETURNING id"),
            # A number that overflows a float: it has no canonical form for the step keys.
            insert_row(db, "INSERT INTO workflows (type, input) VALUES ('three_steps', "
                           "jsonb_build_object('n', ('1' || repeat('0', 400) || '.5')::numeric)) RETURNING id"),
            # Nested deeper than Python's recursion limit; an explicit key, as the SQL
            # trigger's own (recursive) key function would refuse it.
            insert_row(db, "INSERT INTO workflows (type, input, idempotency_key) VALUES ('three_steps', "
                           "jsonb_build_object('deep', (repeat('[', 3000) || repeat(']', 3000))::jsonb), "
                           "'deep-1') RETURNING id"),
        ],
        "DefinitionMismatch": [
            insert_row(db, "INSERT INTO workflows (type, input, current_step_index) "
                           "VALUES ('three_steps', '{\"x\": 1}', 7) RETURNING id"),
        ],
        "InvalidRow": [
            insert_row(db, "INSERT INTO workflows (type, input, current_step_index) "
                           "VALUES ('three_steps', '{\"x\": 2}', 1) RETURNING id"),
        ],
        "InputValidationError": [
            insert_row(db, "INSERT INTO workflows (type, input) "
                           "VALUES ('validated', '{\"order_id\": \"x\"}') RETURNING id"),
            # A saga refused before any step ran: failed, not "compensated" with nothing undone.
            insert_row(db, "INSERT INTO workflows (type, input) "
                           "VALUES ('trade_execution', '{\"tokenA\": \"ETH\"}') RETURNING id"),
        ],
    }  # fmt: skip
    insert_workflows(db, "three_steps", 50)
    daemon = daemons.start()

    started = time.monotonic()
    wait_until(lambda: all_finished(db, 50), 30, "the 50 good workflows to complete")
    failed = sum(len(ids) for ids in bad.values())
    wait_until(lambda: states(db).get("failed") == failed, 10, "every bad row to fail")
    assert time.monotonic() - started < 20

    for error_type, ids in bad.items():
        for workflow_id in ids:
            error = error_of(db, workflow_id)
            assert error["type"] == error_type, error
            assert error["message"]
            timeline = db.execute(
                "SELECT to_state FROM workflow_events WHERE workflow_id = %s AND step_index IS NULL ORDER BY id",
                (workflow_id,),
            ).fetchall()
            assert timeline == [("running",), ("failed",)], timeline  # claimed, then failed alone
    assert daemon.process.poll() is None
    assert claim_crashes(daemon) == []
    assert rejections(daemon) == {
        "unreadable_input": 3.0,
        "definition_mismatch": 1.0,
        "invalid_row": 1.0,
        "input_validation_error": 2.0,
    }


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("input", "'[1, 2]'", "workflows_input_is_a_json_object"),
        ("input", "'\"text\"'", "workflows_input_is_a_json_object"),
        ("context", "'[]'", "workflows_context_is_a_json_object"),
        ("input", "jsonb_build_object('blob', repeat('x', 1100000))", "workflows_input_at_most_1_mib"),
    ],
)
def test_rows_no_daemon_could_run_are_refused_at_insert_naming_the_rule(
    db: psycopg.Connection[Any], column: str, value: str, constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        db.execute(f"INSERT INTO workflows (type, {column}) VALUES ('three_steps', {value})")


def test_an_output_json_dumps_cannot_write_completes_its_workflow(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "decimal_output", 1)
    insert_workflows(db, "three_steps", 20)
    wait_until(lambda: all_finished(db, 21), 20, "every workflow, the Decimal one too, to complete")
    context = db.execute("SELECT context FROM workflows WHERE type = 'decimal_output'").fetchone()
    assert context is not None
    assert context[0]["price"] == {"amount": 1.1, "meta": {"currency": "EUR"}}
    # The next step saw the stored form of the output, as it would after a restart.
    assert context[0]["after"]["seen"] == ["price"]


def test_a_non_idempotent_step_that_times_out_runs_once_and_fails_as_outcome_unknown(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "at_most_once", 1, sleep=3)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    (workflow_id,) = db.execute("SELECT id FROM workflows").fetchone()  # type: ignore[misc]
    error = error_of(db, workflow_id)
    assert error["type"] == "OutcomeUnknown"
    assert "timeout" in error["message"]
    # Let the thread finish: it ran once, and nothing started it again.
    wait_until(lambda: len(effects(db, "transfer:end")) == 1, 10, "the timed-out thread to return")
    time.sleep(2.5)  # a retry would have been due within 1.1 s of the failure
    assert [attempt for attempt, _ in effects(db, "transfer:start")] == [1]


def test_a_non_idempotent_step_is_retried_only_after_not_executed(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "payment", 1, not_executed_times=2)
    insert_workflows(db, "payment", 1, **{"break": True})
    wait_until(lambda: states(db) == {"completed": 1, "failed": 1}, 20, "one payment to land, one to fail")
    by_outcome = dict(
        db.execute("SELECT state::text, id FROM workflows").fetchall()  # type: ignore[arg-type]
    )
    assert db.execute(
        "SELECT array_agg(attempt ORDER BY attempt) FROM test_effects WHERE workflow_id = %s",
        (by_outcome["completed"],),
    ).fetchone() == ([1, 2, 3],)
    error = error_of(db, by_outcome["failed"])
    assert error["type"] == "OutcomeUnknown"
    assert "ConnectionResetError" in error["message"]
    assert db.execute(
        "SELECT count(*) FROM test_effects WHERE workflow_id = %s", (by_outcome["failed"],)
    ).fetchone() == (1,)


def test_no_new_attempt_starts_in_a_process_while_a_timed_out_thread_runs(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start()
    insert_workflows(db, "lingering", 1, sleep=2.5)
    wait_until(lambda: all_finished(db, 1, "failed"), 30, "both attempts to time out")
    wait_until(lambda: len(effects(db, "linger:end")) == 2, 15, "both threads to return")
    starts = effects(db, "linger:start")
    ends = effects(db, "linger:end")
    assert [attempt for attempt, _ in starts] == [1, 2]
    # The retry was due within about a second, but waited for the first thread.
    assert starts[1][1] >= ends[0][1]
    assert any(e["event"] == "step_thread_still_running" for e in daemon.log_events())


def test_a_step_that_kills_its_process_ends_when_its_retries_do(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    insert_workflows(db, "crash_loop", 1)
    insert_workflows(db, "sturdy", 20)
    crash_modules = {"WORKFLOWD_MODULES": "tests.e2e.flows,tests.e2e.crash_flows"}
    daemon = daemons.start(crash_modules)
    restarts = 0
    deadline = time.monotonic() + 90
    while not (all_finished(db, 1, "failed") and all_finished(db, 20)):
        assert time.monotonic() < deadline, f"still {states(db)} after {restarts} restarts"
        if daemon.process.poll() is not None:  # a supervisor restarts the daemon
            daemon = daemons.start(crash_modules)
            restarts += 1
        time.sleep(0.1)
    assert len(effects(db, "crash")) == 3  # max_retries=2: three attempts, each a crash
    (workflow_id,) = db.execute("SELECT id FROM workflows WHERE type = 'crash_loop'").fetchone()  # type: ignore[misc]
    error = error_of(db, workflow_id)
    assert error["type"] == "WorkerDied"
    assert "'crash'" in error["message"]
    assert daemon.process.poll() is None


def test_a_hung_step_is_stopped_by_the_default_step_timeout(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start(step_timeout=1)
    insert_workflows(db, "hanging", 1)
    wait_until(lambda: all_finished(db, 1, "failed"), 15, "the hung step to time out")
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "StepTimeout"


def test_every_daemon_session_has_a_statement_timeout(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    daemons.start(statement_timeout=0.5)
    insert_workflows(db, "slow_statement", 1, seconds=3)
    wait_until(lambda: all_finished(db, 1, "failed"), 15, "the slow statement to be cancelled")
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "QueryCanceled"
    assert "statement timeout" in error["message"]


def test_a_compensation_gets_its_own_idempotency_key(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    daemons.start()
    insert_workflows(db, "keyed_saga", 1, fail_at="pay")
    wait_until(lambda: all_finished(db, 1, "compensated"), 20, "the saga to compensate")
    keys = dict(db.execute("SELECT step_name, idempotency_key FROM test_effects").fetchall())
    assert keys["book"].startswith("step:book:")
    assert keys["undo:book"].startswith("compensate:book:")
    assert keys["undo:book"].removeprefix("compensate:") == keys["book"].removeprefix("step:")


def test_a_transactional_step_that_must_not_run_twice_is_outcome_unknown_when_its_connection_drops(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start()
    insert_workflows(db, "cut_transaction", 1)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "OutcomeUnknown"
    assert len(effects(db, "book")) == 1
    assert any(e["event"] == "transactional_step_interrupted" for e in daemon.log_events())


def test_a_transactional_step_failing_on_a_dead_connection_is_retried_not_crashed(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    # Its transaction cannot even be rolled back: the failure is still recorded (the
    # daemons fixture fails the test on any *_crashed line).
    daemons.start()
    insert_workflows(db, "cut_then_fail", 1, fail=True)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "both attempts to fail")
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "RuntimeError"
    assert [attempt for attempt, _ in effects(db, "book")] == [1, 2]


def test_a_compensation_that_kills_its_process_ends_when_its_retries_do(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    insert_workflows(db, "crash_loop_undo", 1)
    crash_modules = {"WORKFLOWD_MODULES": "tests.e2e.flows,tests.e2e.crash_flows"}
    daemon = daemons.start(crash_modules)
    deadline = time.monotonic() + 60
    while not all_finished(db, 1, "failed"):
        assert time.monotonic() < deadline, f"still {states(db)}"
        if daemon.process.poll() is not None:  # a supervisor restarts the daemon
            daemon = daemons.start(crash_modules)
        time.sleep(0.1)
    assert len(effects(db, "undo:book")) == 2  # max_retries=1: two attempts, each a crash
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "WorkerDied"
    assert "compensation of step 'book'" in error["message"]
