"""Life-cycle paths of a workflow against real daemons: cancels in every state that
matters, a failure whose outcome is unknown followed by compensation, claim order and
the concurrency cap, the built-in switch, and the daemon through a database outage."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine import IllegalTransitionError, WorkflowService, WorkflowState
from tests.e2e.conftest import (
    Daemons,
    all_finished,
    assert_timeline_is_legal,
    insert_workflows,
    states,
    wait_until,
)
from tests.proxy import CuttableProxy

TOKEN = "lifecycle-token-0123456789abcdef0123456789"


def only_workflow(db: psycopg.Connection[Any]) -> Any:
    (workflow_id,) = db.execute("SELECT id FROM workflows").fetchone()  # type: ignore[misc]
    return workflow_id


def state_of(db: psycopg.Connection[Any], workflow_id: Any) -> str:
    row = db.execute("SELECT state::text FROM workflows WHERE id = %s", (workflow_id,)).fetchone()
    assert row is not None
    return str(row[0])


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


async def cancel(db_url: str, workflow_id: Any) -> WorkflowState:
    async with WorkflowService.connect(db_url) as service:
        return (await service.cancel_workflow(workflow_id)).state


def test_cancel_is_refused_while_compensating_and_once_failed(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    insert_workflows(db, "saga", 1, fail_at="ship", undo_sleep=1.5)
    workflow_id = only_workflow(db)
    wait_until(lambda: state_of(db, workflow_id) == "compensating", 20, "the saga to compensate")
    with pytest.raises(IllegalTransitionError, match="from compensating to cancelled"):
        run(cancel(db_url, workflow_id))
    wait_until(lambda: all_finished(db, 1, "compensated"), 30, "the compensation to finish")

    insert_workflows(db, "permanent", 1)
    failed_id = db.execute("SELECT id FROM workflows WHERE type = 'permanent'").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: state_of(db, failed_id) == "failed", 20, "the workflow to fail")
    with pytest.raises(IllegalTransitionError, match="from failed to cancelled"):
        run(cancel(db_url, failed_id))
    assert_timeline_is_legal(db)


def test_a_manually_retried_workflow_can_be_cancelled_before_it_runs_again(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    insert_workflows(db, "plain_failing", 1, fail_at="charge")
    workflow_id = only_workflow(db)
    wait_until(lambda: state_of(db, workflow_id) == "failed", 20, "charge to fail")
    daemons.stop_all()  # nobody claims it again before the cancel

    async def scenario() -> WorkflowState:
        async with WorkflowService.connect(db_url) as service:
            retried = await service.retry_workflow(workflow_id)
            assert retried.state is WorkflowState.PENDING
            return (await service.cancel_workflow(workflow_id)).state

    assert run(scenario()) is WorkflowState.CANCELLED
    assert dict(db.execute("SELECT step_name, state::text FROM workflow_steps").fetchall()) == {
        "reserve": "completed",
        "charge": "skipped",
    }
    assert_timeline_is_legal(db)


def test_cancelling_a_workflow_waiting_out_a_backoff_takes_effect_at_once(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    insert_workflows(db, "retrying", 1, fail_times=99)
    workflow_id = only_workflow(db)
    # After the third failure the next retry is 4 s away (1 s x 2^2, +-10 %).
    wait_until(
        lambda: db.execute("SELECT retry_count FROM workflow_steps").fetchone() == (3,), 20, "three failures"
    )
    asked = time.monotonic()
    # Flagged; or already honoured, when the daemon woke by the cancel's NOTIFY was
    # quicker than the command's own read-back.
    assert run(cancel(db_url, workflow_id)) in (WorkflowState.RUNNING, WorkflowState.CANCELLED)
    wait_until(lambda: state_of(db, workflow_id) == "cancelled", 10, "the cancel")
    assert time.monotonic() - asked < 2.5, "the cancel waited for the backoff"


def test_an_outcome_unknown_failure_compensates_the_steps_before_it(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "unknown_saga", 1, **{"break": True})
    wait_until(lambda: all_finished(db, 1, "compensated"), 20, "the saga to compensate")
    (error,) = db.execute("SELECT error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["type"] == "OutcomeUnknown"
    assert dict(db.execute("SELECT step_name, state::text FROM workflow_steps").fetchall()) == {
        "reserve": "compensated",
        "send": "failed",
    }
    assert db.execute("SELECT count(*) FROM test_effects WHERE step_name = 'send'").fetchone() == (1,)
    assert_timeline_is_legal(db)


def test_the_claim_takes_the_lowest_priority_number_first(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    insert_workflows(db, "three_steps", 20)
    db.execute(
        "INSERT INTO workflows (type, input, user_id, priority) VALUES ('three_steps', '{\"urgent\": 1}', 'e2e', -5)"
    )
    daemons.start(concurrency=1)
    wait_until(lambda: all_finished(db, 21), 30, "every workflow to complete")
    first = db.execute("SELECT input FROM workflows ORDER BY started_at LIMIT 1").fetchone()
    assert first == ({"urgent": 1},)


def test_a_daemon_runs_at_most_its_concurrency_at_once(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    daemons.start(concurrency=2)
    insert_workflows(db, "three_steps", 6, sleep=0.3)
    wait_until(lambda: all_finished(db, 6), 40, "every workflow to complete")
    # Each step records when it starts and sleeps 0.3 s: count the starts within any
    # 0.25 s window, which at most `concurrency` steps can share.
    starts = [
        float(row[0]) for row in db.execute("SELECT extract(epoch FROM at) FROM test_effects ORDER BY at")
    ]
    crowded = max(sum(1 for other in starts if start <= other < start + 0.25) for start in starts)
    assert crowded <= 2


def test_with_builtins_off_a_daemon_serves_only_its_modules(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start(builtins="false")
    (types,) = db.execute("SELECT types FROM workflow_workers").fetchone()  # type: ignore[misc]
    assert "three_steps" in types
    assert not {"trade_execution", "reward_grant", "contract_deployment"} & set(types)


def test_through_a_database_outage_the_api_answers_503_and_the_errors_are_counted(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    parts = conninfo_to_dict(db_url)
    with CuttableProxy(str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432))).running() as proxy:
        via_proxy = make_conninfo(db_url, host="127.0.0.1", port=proxy.port)
        daemon = daemons.start(env_extra={"DATABASE_URL": via_proxy}, admin_token=TOKEN, poll_interval=0.1)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{daemon.url}/admin/workflows", headers=headers, timeout=5).status_code == 200
        proxy.cut()
        asked = time.monotonic()
        answer = httpx.get(f"{daemon.url}/admin/workflows", headers=headers, timeout=15)
        assert answer.status_code == 503
        assert time.monotonic() - asked < 10
        assert answer.json()["detail"].startswith("database unavailable")
        # The readiness answer is kept for a second.
        wait_until(lambda: httpx.get(f"{daemon.url}/readyz", timeout=10).status_code == 503, 10, "unready")
        metrics = httpx.get(f"{daemon.url}/metrics", timeout=5).text
        assert 'workflowd_database_errors_total{operation="claim"}' in metrics
        proxy.restore()
        insert_workflows(db, "three_steps", 1)
        wait_until(lambda: all_finished(db, 1), 30, "the daemon to work again after the outage")


def test_livez_fails_while_the_claim_loop_is_stuck_and_recovers_after(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    # A claim that waits on a table lock (SKIP LOCKED skips locked rows, not a locked
    # table) for longer than the liveness window: the HTTP server still answers, and says
    # the worker loop is stuck, so a supervisor restarts the daemon.
    daemon = daemons.start(lock_timeout=60, statement_timeout=60, poll_interval=0.2)
    assert httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 200
    with psycopg.connect(db_url) as blocker:
        blocker.execute("LOCK TABLE workflows IN ACCESS EXCLUSIVE MODE")
        stalled = wait_until(
            lambda: (r := httpx.get(f"{daemon.url}/livez", timeout=5)).status_code == 503 and r, 45,
            "/livez to report the stuck loop",
        )  # fmt: skip
        assert stalled.json()["status"] == "stalled"
        blocker.rollback()
    wait_until(
        lambda: httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 200, 15, "/livez to recover"
    )


def test_connections_that_land_on_a_read_only_server_are_dropped_and_no_step_is_failed(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    """What a daemon meets when its URL leads to a standby, or to an old primary restarted
    as a replica: every new session is read-only. It retries, and fails nothing."""
    name = conninfo_to_dict(db_url)["dbname"]
    daemon = daemons.start(poll_interval=0.1)
    db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    db.execute(  # the daemon's sessions end; the ones it opens next are read-only
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'workflowd%'"
    )
    # The test's own session began read-write and stays so.
    insert_workflows(db, "three_steps", 5)
    time.sleep(3)
    assert states(db) == {"pending": 5}
    db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    wait_until(lambda: all_finished(db, 5), 30, "the daemon to work again on a writable server")
    assert db.execute("SELECT max(retry_count) FROM workflow_steps").fetchone() == (0,)
    events = [event["event"] for event in daemon.log_events()]
    assert "claim_failed" in events
    assert daemon.alive
