"""The daemon under load and under attack: many processes, kill -9, SIGSTOP past the lease,
SIGTERM, retries, timeouts and dropped connections. Invariants are checked in the database.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tests.e2e.conftest import Daemons, all_finished, insert_workflows, states, wait_until
from tests.invariants import assert_invariants


def step_ledger(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Per step row: its state, how many completions the event log holds, how often it ran."""
    with db.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            """
            SELECT s.workflow_id, s.step_index, s.step_name, s.state::text, s.attempt, s.output,
                   (SELECT count(*) FROM workflow_events e WHERE e.workflow_id = s.workflow_id
                      AND e.step_index = s.step_index AND e.to_state = 'completed') AS commits,
                   (SELECT count(*) FROM test_effects f WHERE f.workflow_id = s.workflow_id
                      AND f.step_name = s.step_name) AS executions
            FROM workflow_steps s ORDER BY s.workflow_id, s.step_index
            """
        )
        return cursor.fetchall()


def assert_every_step_committed_exactly_once(db: psycopg.Connection[Any], workflows: int, steps: int) -> None:
    ledger = step_ledger(db)
    assert len(ledger) == workflows * steps
    assert {row["state"] for row in ledger} == {"completed"}
    assert {row["commits"] for row in ledger} == {1}, "a step result was committed twice or never"
    assert all(row["executions"] >= 1 for row in ledger), "a step was committed without running"
    # The committed output is the one of the attempt that the step row records.
    assert all(row["output"]["attempt"] == row["attempt"] for row in ledger)
    finished = db.execute(
        "SELECT count(*) FROM workflow_events WHERE step_index IS NULL AND to_state = 'completed'"
    ).fetchone()
    assert finished == (workflows,)


def test_three_daemons_complete_500_three_step_workflows_exactly_once(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    for _ in range(3):
        daemons.start()
    insert_workflows(db, "three_steps", 500)
    wait_until(lambda: all_finished(db, 500), 90, "500 workflows to complete")
    assert_every_step_committed_exactly_once(db, 500, 3)
    # Nothing was run twice: no crash happened, so every step executed exactly once.
    assert db.execute(
        "SELECT count(*), count(DISTINCT (workflow_id, step_name)) FROM test_effects"
    ).fetchone() == (
        1500,
        1500,
    )
    # The work was shared: every daemon committed some steps.
    workers = db.execute(
        "SELECT count(DISTINCT worker_id) FROM workflow_events WHERE to_state = 'completed'"
    ).fetchone()
    assert workers == (3,)
    # Every attempt got the step's idempotency key, as the SQL function computed it.
    mismatched = db.execute(
        "SELECT count(*) FROM test_effects f JOIN workflow_steps s "
        "ON s.workflow_id = f.workflow_id AND s.step_name = f.step_name WHERE s.idempotency_key <> f.idempotency_key"
    ).fetchone()
    assert mismatched == (0,)
    # The plain-function step ran in the daemon's thread pool, not on its event loop.
    threads = db.execute(
        "SELECT DISTINCT output->>'thread' LIKE 'step%%' FROM workflow_steps WHERE step_name = 'second'"
    )
    assert threads.fetchall() == [(True,)]
    # Later steps saw the outputs of the earlier ones.
    seen = db.execute(
        "SELECT DISTINCT output->'seen' FROM workflow_steps WHERE step_name = 'third'"
    ).fetchall()
    assert seen == [(["first", "second"],)]


def test_kill_9_with_steps_in_flight_loses_nothing(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    lease, poll = 2.0, 0.2
    victim = daemons.start(lease_seconds=lease, poll_interval=poll)
    insert_workflows(db, "three_steps", 30, sleep=0.4)
    wait_until(
        lambda: (
            db.execute(
                "SELECT count(*) FROM workflows WHERE locked_by LIKE %s", (f"%-{victim.pid}-%",)
            ).fetchone()[0]  # type: ignore[index]
            >= 10
        ),
        15,
        "the victim to hold 10 leases",
    )
    # Kill it mid-step: once some step has recorded its effect but not yet committed.
    wait_until(
        lambda: (
            db.execute(
                "SELECT EXISTS (SELECT FROM test_effects e WHERE NOT EXISTS (SELECT FROM workflow_steps s "
                "WHERE s.workflow_id = e.workflow_id AND s.step_name = e.step_name AND s.state = 'completed'))"
            ).fetchone()
            == (True,)
        ),
        15,
        "a step to be in flight",
    )
    victim.signal(signal.SIGKILL)
    victim.process.wait(timeout=5)
    orphans = db.execute(
        "SELECT id, now() FROM workflows WHERE locked_by LIKE %s AND state = 'running'",
        (f"%-{victim.pid}-%",),
    ).fetchall()
    assert orphans, "the victim held no workflow when it died"
    killed_at = orphans[0][1]
    daemons.start(lease_seconds=lease, poll_interval=poll)
    wait_until(lambda: all_finished(db, 30), 60, "every workflow to complete after the kill")
    assert_every_step_committed_exactly_once(db, 30, 3)
    assert_invariants(db, expected_completed=30, daemons=daemons.all_but(victim))
    # Each orphan resumed, with its interrupted step started again, within lease + poll.
    resumed = db.execute(
        "SELECT workflow_id, min(at) FROM workflow_events WHERE workflow_id = ANY(%s) AND to_state = 'running' "
        "AND at > %s GROUP BY workflow_id",
        ([orphan_id for orphan_id, _ in orphans], killed_at),
    ).fetchall()
    assert len(resumed) == len(orphans)
    # The replacement daemon needed a moment to start: measure from the lease expiry instead.
    for _, at in resumed:
        assert at - killed_at <= timedelta(seconds=lease + poll + 5)
    reruns = db.execute(
        "SELECT count(*) FROM (SELECT workflow_id, step_name FROM test_effects GROUP BY 1, 2 HAVING count(*) > 1) r"
    ).fetchone()
    assert reruns is not None
    assert 1 <= reruns[0] <= len(orphans), "only the interrupted steps ran twice"


def test_orphans_resume_within_lease_plus_poll_when_another_daemon_is_up(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    lease, poll = 1.5, 0.2
    victim = daemons.start(lease_seconds=lease, poll_interval=poll)
    # Steps long enough that the victim is still in its first ones when the survivor
    # has started (which takes a few seconds on a busy machine).
    insert_workflows(db, "three_steps", 8, sleep=2.0)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM workflows WHERE locked_by IS NOT NULL").fetchone() == (8,),
        15,
        "the victim to hold every workflow",
    )
    survivor = daemons.start(lease_seconds=lease, poll_interval=poll)  # idle: everything is leased
    victim.signal(signal.SIGKILL)
    killed_at = db.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: all_finished(db, 8), 60, "every workflow to complete")
    assert survivor.process.poll() is None
    restarts = db.execute(
        "SELECT min(at) FROM workflow_events WHERE to_state = 'running' AND step_index IS NOT NULL "
        "AND at > %s GROUP BY workflow_id",
        (killed_at,),
    ).fetchall()
    assert len(restarts) == 8
    # Every orphan's interrupted step started again within lease + poll (and a little slack).
    assert max(at for (at,) in restarts) - killed_at <= timedelta(seconds=lease + poll + 0.5)
    assert_every_step_committed_exactly_once(db, 8, 3)
    assert_invariants(db, expected_completed=8, daemons=daemons.all_but(victim))


def test_a_stale_worker_resumed_after_sigstop_commits_nothing(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    stale = daemons.start(lease_seconds=1, poll_interval=0.2)
    insert_workflows(db, "three_steps", 1, sleep=1.5)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,),
        15,
        "the first step to start",
    )
    stale.signal(signal.SIGSTOP)
    fresh = daemons.start(lease_seconds=1, poll_interval=0.2)
    wait_until(lambda: all_finished(db, 1), 30, "the other daemon to finish the workflow")
    stale.signal(signal.SIGCONT)
    wait_until(
        lambda: any(event["event"] == "lease_lost" for event in stale.log_events()),
        15,
        "the stale worker to notice its lost lease",
    )
    assert_every_step_committed_exactly_once(db, 1, 3)
    committers = db.execute(
        "SELECT DISTINCT worker_id FROM workflow_events WHERE to_state = 'completed'"
    ).fetchall()
    assert len(committers) == 1
    assert str(fresh.pid) in committers[0][0]
    # The first step really ran twice (once per worker) but was committed once.
    assert db.execute("SELECT count(*) FROM test_effects WHERE step_name = 'first'").fetchone() == (2,)
    assert stale.process.poll() is None, "the stale daemon keeps running"
    lost = httpx.get(f"{stale.url}/metrics", timeout=5).text
    assert "workflowd_lost_leases_total 1.0" in lost.splitlines()
    assert_invariants(db, expected_completed=1, daemons=daemons.all_but())


def test_the_heartbeat_keeps_the_lease_of_a_step_longer_than_the_lease(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    for _ in range(2):
        daemons.start(lease_seconds=1, poll_interval=0.1)
    insert_workflows(db, "three_steps", 4, sleep=2.5)
    wait_until(lambda: all_finished(db, 4), 60, "the long steps to complete")
    assert_every_step_committed_exactly_once(db, 4, 3)
    # No other daemon took a step over while its 2.5 s ran under a 1 s lease.
    assert db.execute(
        "SELECT count(*), count(DISTINCT (workflow_id, step_name)) FROM test_effects"
    ).fetchone() == (12, 12)
    assert not any(
        event["event"] == "lease_lost" for daemon in daemons.started for event in daemon.log_events()
    )


def test_a_step_failing_twice_then_succeeding_is_retried_with_backoff(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "retrying", 1, fail_times=2)
    wait_until(lambda: all_finished(db, 1), 30, "the flaky workflow to complete")
    step = db.execute("SELECT state::text, retry_count, attempt, output FROM workflow_steps").fetchone()
    assert step == ("completed", 2, 3, {"succeeded_on": 3})
    with db.cursor(row_factory=dict_row) as cursor:
        cursor.execute("SELECT to_state, at, error FROM workflow_events WHERE step_index = 0 ORDER BY id")
        events = cursor.fetchall()
    assert [event["to_state"] for event in events] == [
        "running",
        "failed",
        "running",
        "failed",
        "running",
        "completed",
    ]
    for retry, (failed, restarted) in enumerate([(events[1], events[2]), (events[3], events[4])]):
        planned = 2.0**retry  # base 1 s, doubling
        assert failed["error"]["message"] == f"flaky failure on attempt {retry + 1}"
        assert "Traceback" in failed["error"]["traceback"]
        gap = (restarted["at"] - failed["at"]).total_seconds()
        assert planned * 0.9 - 0.05 <= gap <= planned * 1.1 + 0.2 + 0.5  # jitter 10 %, poll 0.2 s


def test_a_permanent_error_fails_at_once_with_a_readable_error(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "permanent", 1)
    wait_until(lambda: all_finished(db, 1, "failed"), 30, "the workflow to fail")
    workflow = db.execute("SELECT error, completed_at IS NOT NULL, locked_by FROM workflows").fetchone()
    assert workflow == (
        {"type": "PermanentError", "message": "card declined", "step": "charge", "attempt": 1},
        True,
        None,
    )
    assert db.execute("SELECT state::text, retry_count FROM workflow_steps").fetchone() == ("failed", 0)
    assert db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,)
    trace = db.execute(
        "SELECT error->>'traceback' FROM workflow_events WHERE step_index = 0 AND to_state = 'failed'"
    ).fetchone()
    assert trace is not None
    assert "PermanentError: card declined" in trace[0]


def test_a_step_exceeding_its_timeout_is_retried_then_fails(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "timing_out", 1)
    wait_until(lambda: all_finished(db, 1, "failed"), 30, "the workflow to fail")
    error = db.execute("SELECT error FROM workflows").fetchone()
    assert error is not None
    assert error[0] == {
        "type": "StepTimeout",
        "message": "step 'slow' exceeded its timeout of 0.3 s",
        "step": "slow",
        "attempt": 2,
    }
    assert db.execute("SELECT retry_count, attempt FROM workflow_steps").fetchone() == (1, 2)
    assert db.execute("SELECT count(*) FROM test_effects").fetchone() == (2,)


def test_sigterm_drains_in_flight_steps_and_exits_zero(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    leaving = daemons.start(shutdown_grace=10)
    insert_workflows(db, "three_steps", 5, sleep=1.0)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (5,), 15, "five steps in flight"
    )
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert leaving.process.wait(timeout=15) == 0
    took = time.monotonic() - started
    assert took < 10, "in-flight steps finished within the grace period"
    # The in-flight steps were committed; the daemon did not go on to the next ones.
    assert db.execute("SELECT count(*) FROM workflow_steps WHERE state = 'completed'").fetchone() == (5,)
    assert db.execute("SELECT count(*) FROM workflows WHERE locked_by IS NOT NULL").fetchone() == (0,)
    assert db.execute(
        "SELECT stopped_at IS NOT NULL FROM workflow_workers WHERE pid = %s", (leaving.pid,)
    ).fetchone() == (True,)
    daemons.start()
    wait_until(lambda: all_finished(db, 5), 30, "another daemon to finish the released workflows")
    assert_every_step_committed_exactly_once(db, 5, 3)
    assert_invariants(db, expected_completed=5, daemons=daemons.all_but(leaving))


def test_sigterm_past_the_grace_period_releases_leases_for_another_daemon(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    leaving = daemons.start(shutdown_grace=1, lease_seconds=30)
    insert_workflows(db, "three_steps", 3, sleep=4)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (3,),
        15,
        "three steps in flight",
    )
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert leaving.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 1 + 2
    # Released at once, not after the 30 s lease: another daemon finishes them now.
    assert db.execute(
        "SELECT count(*) FROM workflows WHERE locked_by IS NULL AND next_retry_at <= now()"
    ).fetchone() == (3,)
    daemons.start(lease_seconds=30)
    wait_until(lambda: all_finished(db, 3), 40, "another daemon to finish the released workflows")
    assert_every_step_committed_exactly_once(db, 3, 3)
    assert_invariants(db, expected_completed=3, daemons=daemons.all_but(leaving))


def test_a_second_signal_exits_at_once(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    leaving = daemons.start(shutdown_grace=20)
    insert_workflows(db, "three_steps", 2, sleep=10)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (2,), 15, "two steps in flight"
    )
    leaving.signal(signal.SIGTERM)
    wait_until(
        lambda: any(e["event"] == "worker_stopping" for e in leaving.log_events()), 10, "the first signal"
    )
    leaving.signal(signal.SIGINT)
    assert leaving.process.wait(timeout=5) == 1  # the README promises exit code 1


def test_terminated_database_connections_are_ridden_out(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    for _ in range(2):
        daemons.start()
    insert_workflows(db, "three_steps", 300, sleep=0.02)
    for _ in range(4):
        time.sleep(0.4)
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
    wait_until(lambda: all_finished(db, 300), 90, f"every workflow to complete (now {states(db)})")
    assert_invariants(db, expected_completed=300, daemons=daemons.all_but())
    assert_every_step_committed_exactly_once(db, 300, 3)
    logged = {event["event"] for daemon in daemons.started for event in daemon.log_events()}
    assert logged & {"claim_failed", "commit_retry", "listener_disconnected", "heartbeat_failed"}


def test_a_result_is_committed_through_a_dropped_connection(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start()
    insert_workflows(db, "cut_connections", 3)
    wait_until(lambda: all_finished(db, 3), 30, "the workflows to complete")
    assert_every_step_committed_exactly_once(db, 3, 2)
    # The step that cut the connections ran once: its result was not lost and redone.
    assert db.execute("SELECT count(*) FROM test_effects WHERE step_name = 'cut'").fetchone() == (3,)
    assert "commit_retry" in {event["event"] for event in daemon.log_events()}
    assert_invariants(db, expected_completed=3, daemons=daemons.all_but())


def test_the_listener_reconnects_and_notifications_wake_the_daemon_again(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    # With a 30 s poll, only a notification can make the daemon pick work up quickly.
    daemon = daemons.start(poll_interval=30)

    def listener_pid() -> int | None:
        row = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'workflowd-listener' AND query = 'LISTEN workflowd'"
        ).fetchone()
        return row[0] if row else None

    first = wait_until(listener_pid, 10, "the listener to LISTEN")
    db.execute("SELECT pg_terminate_backend(%s)", (first,))
    wait_until(lambda: (pid := listener_pid()) is not None and pid != first, 10, "the listener to reconnect")
    time.sleep(0.5)  # let the reconnect's own catch-up claim pass
    inserted_at = time.monotonic()
    insert_workflows(db, "three_steps", 1)
    wait_until(lambda: all_finished(db, 1), 10, "the notified daemon to run the workflow")
    assert time.monotonic() - inserted_at < 5
    assert "listener_disconnected" in {event["event"] for event in daemon.log_events()}


def test_sql_rows_with_invalid_input_fail_without_retries_and_the_daemon_keeps_going(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start()
    db.execute(
        "INSERT INTO workflows (type, input, user_id) VALUES "
        """('validated', '{"order_id": "seven"}', 'u1'), ('validated', '{"order_id": 7, "amount": 9.5}', 'u1')"""
    )
    wait_until(lambda: states(db) == {"failed": 1, "completed": 1}, 20, "one failure and one completion")
    error = db.execute("SELECT error FROM workflows WHERE state = 'failed'").fetchone()
    assert error is not None
    assert error[0]["type"] == "InputValidationError"
    assert error[0]["messages"] == [
        "order_id: Input should be a valid integer, unable to parse string as an integer",
        "amount: Field required",
    ]
    assert db.execute(
        "SELECT count(*) FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id WHERE w.state = 'failed'"
    ).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,)
    insert_workflows(db, "three_steps", 2)
    wait_until(lambda: states(db).get("completed") == 3, 20, "the daemon to keep working")
    assert daemon.process.poll() is None


def test_an_input_too_large_for_a_float_fails_its_workflow_and_not_the_claims(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    # Valid jsonb, but Python reads the number as a float and it overflows to inf, which
    # has no canonical form for the steps' idempotency keys.
    huge = "1" + "0" * 400 + ".5"
    daemon = daemons.start()
    db.execute(
        "INSERT INTO workflows (type, input, user_id) VALUES ('three_steps', %s::jsonb, 'u1')",
        (f'{{"amount": {huge}}}',),
    )
    insert_workflows(db, "three_steps", 2)
    wait_until(lambda: states(db) == {"failed": 1, "completed": 2}, 20, "one failure and two completions")
    error = db.execute("SELECT error FROM workflows WHERE state = 'failed'").fetchone()
    assert error is not None
    assert error[0]["type"] == "UnreadableInput"
    assert "is not a JSON number" in error[0]["message"]
    assert daemon.process.poll() is None


def test_an_interrupted_non_idempotent_step_fails_as_outcome_unknown_and_is_not_rerun(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    victim = daemons.start(lease_seconds=1)
    insert_workflows(db, "not_idempotent", 1)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,), 15, "the step to start"
    )
    victim.signal(signal.SIGKILL)
    daemons.start(lease_seconds=1)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    error = db.execute("SELECT error FROM workflows").fetchone()
    assert error is not None
    assert error[0]["type"] == "OutcomeUnknown"
    assert error[0]["message"].startswith("outcome unknown: the worker running step 'transfer' (attempt 1)")
    assert db.execute("SELECT state::text, attempt FROM workflow_steps").fetchone() == ("failed", 1)
    assert db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,), "the step was not run again"
    assert_invariants(db, expected_completed=0, daemons=daemons.all_but(victim))


def test_broken_step_code_fails_its_workflow_and_the_daemon_keeps_running(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start()
    insert_workflows(db, "broken_exit", 1)
    insert_workflows(db, "broken_output", 1)
    wait_until(lambda: all_finished(db, 2, "failed"), 20, "both broken workflows to fail")
    errors = dict(db.execute("SELECT type, error->>'type' FROM workflows").fetchall())
    assert errors == {"broken_exit": "SystemExit", "broken_output": "InvalidStepOutput"}
    insert_workflows(db, "three_steps", 1)
    wait_until(lambda: states(db).get("completed") == 1, 20, "the daemon to keep working")
    assert daemon.process.poll() is None
