"""The guarantees the product is sold on, each proven against real daemons: compensation,
cancellation, manual retry, transactional steps, unserved types, timeline, wait_for."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from typing import Any

import psycopg
import pytest

from engine import IllegalTransitionError, WorkflowService, WorkflowState
from tests.e2e.conftest import (
    Daemons,
    all_finished,
    assert_timeline_is_legal,
    insert_workflows,
    states,
    wait_until,
)
from tests.invariants import assert_invariants


def effects(db: psycopg.Connection[Any], step_name: str) -> int:
    row = db.execute("SELECT count(*) FROM test_effects WHERE step_name = %s", (step_name,)).fetchone()
    assert row is not None
    return int(row[0])


def step_states(db: psycopg.Connection[Any], workflow_id: Any = None) -> dict[str, str]:
    rows = db.execute(
        "SELECT step_name, state::text FROM workflow_steps WHERE %s::uuid IS NULL OR workflow_id = %s ORDER BY step_index",
        (workflow_id, workflow_id),
    ).fetchall()
    return dict(rows)


def workflow_transitions(db: psycopg.Connection[Any]) -> list[tuple[str | None, str]]:
    return db.execute(
        "SELECT from_state, to_state FROM workflow_events WHERE step_index IS NULL ORDER BY id"
    ).fetchall()


def test_a_failed_saga_compensates_its_completed_steps_in_reverse_order(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "saga", 1, fail_at="ship")
    wait_until(lambda: all_finished(db, 1, "compensated"), 30, "the saga to compensate")
    row = db.execute(
        "SELECT is_compensated, error->>'message', completed_at IS NOT NULL FROM workflows"
    ).fetchone()
    assert row == (True, "ship refused", True)
    assert step_states(db) == {
        "reserve": "compensated",
        "notify": "compensated",
        "charge": "compensated",
        "ship": "failed",
    }
    undone = db.execute(
        "SELECT step_name FROM test_effects WHERE step_name LIKE 'undo:%%' ORDER BY at"
    ).fetchall()
    assert undone == [("undo:charge",), ("undo:reserve",)]  # reverse order; notify had nothing to undo
    assert workflow_transitions(db) == [
        ("pending", "running"), ("running", "failed"), ("failed", "compensating"), ("compensating", "compensated"),
    ]  # fmt: skip
    compensations = db.execute(
        "SELECT step_name, from_state, to_state FROM workflow_events WHERE step_index IS NOT NULL "
        "AND to_state IN ('compensating', 'compensated') ORDER BY id"
    ).fetchall()
    assert compensations == [
        ("charge", "completed", "compensating"), ("charge", "compensating", "compensated"),
        ("notify", "completed", "compensating"), ("notify", "compensating", "compensated"),
        ("reserve", "completed", "compensating"), ("reserve", "compensating", "compensated"),
    ]  # fmt: skip
    assert_timeline_is_legal(db)


def test_a_compensation_retries_with_backoff_then_gives_up_naming_the_step_and_is_redriven(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    db.execute("INSERT INTO test_switches VALUES ('break:undo:reserve')")
    daemons.start()
    insert_workflows(db, "saga", 1, fail_at="charge")
    wait_until(lambda: all_finished(db, 1, "failed"), 30, "the compensation to give up")
    workflow_id, error = db.execute("SELECT id, error FROM workflows").fetchone()  # type: ignore[misc]
    assert error["step"] == "reserve"
    assert error["message"] == "undo of reserve is broken"
    assert effects(db, "undo:reserve") == 3  # one attempt and the saga's two retries
    assert step_states(db)["reserve"] == "compensating"
    assert step_states(db)["notify"] == "compensated"
    # Mend the compensation, then re-drive it with the compensate command.
    db.execute("DELETE FROM test_switches")

    async def redrive() -> WorkflowState:
        async with WorkflowService.connect(db_url) as service:
            with pytest.raises(IllegalTransitionError, match="compensation has begun"):
                await service.retry_workflow(workflow_id)
            await service.compensate_workflow(workflow_id)
            return (await service.wait_for(workflow_id, timeout=20)).state

    assert asyncio.run(redrive()) is WorkflowState.COMPENSATED
    assert step_states(db)["reserve"] == "compensated"
    assert effects(db, "undo:reserve") == 4
    assert effects(db, "undo:charge") == 0  # charge never completed: nothing to undo
    assert_timeline_is_legal(db)


def test_a_compensation_interrupted_by_kill_9_resumes_and_each_step_is_compensated_once(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    victim = daemons.start(lease_seconds=1)
    insert_workflows(db, "saga", 3, fail_at="ship", undo_sleep=1.5)
    wait_until(lambda: effects(db, "undo:charge") == 3, 30, "the compensations of charge to be in flight")
    victim.signal(signal.SIGKILL)
    victim.process.wait(timeout=5)
    daemons.start(lease_seconds=1)
    wait_until(lambda: all_finished(db, 3, "compensated"), 40, "the sagas to finish compensating")
    on_the_books = db.execute(
        "SELECT step_name, count(*) FROM workflow_events WHERE to_state = 'compensated' AND step_index IS NOT NULL "
        "GROUP BY step_name ORDER BY step_name"
    ).fetchall()
    assert on_the_books == [("charge", 3), ("notify", 3), ("reserve", 3)]
    assert effects(db, "undo:charge") == 6  # the interrupted compensations ran again (at least once)
    assert effects(db, "undo:reserve") == 3
    assert_invariants(db, expected_completed=0, daemons=daemons.all_but(victim))


def test_compensate_undoes_a_failed_workflow_whose_definition_does_not(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    insert_workflows(db, "plain_failing", 1, fail_at="charge")
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    assert effects(db, "undo:reserve") == 0

    async def compensate() -> WorkflowState:
        async with WorkflowService.connect(db_url) as service:
            (workflow,) = (await service.list_workflows()).items
            await service.compensate_workflow(workflow.id)
            return (await service.wait_for(workflow.id, timeout=20)).state

    assert asyncio.run(compensate()) is WorkflowState.COMPENSATED
    assert effects(db, "undo:reserve") == 1
    assert step_states(db) == {"reserve": "compensated", "charge": "failed"}


def test_a_pending_workflow_is_cancelled_at_once(db_url: str, db: psycopg.Connection[Any]) -> None:
    async def scenario() -> None:
        async with WorkflowService.connect(db_url) as service:
            workflow = await service.start_workflow("nobody_serves_this", {"x": 1}, "u1")
            cancelled = await service.cancel_workflow(workflow.id)
            assert cancelled.state is WorkflowState.CANCELLED
            assert cancelled.completed_at is not None
            with pytest.raises(IllegalTransitionError, match="cannot go from cancelled to cancelled"):
                await service.cancel_workflow(workflow.id)

    asyncio.run(scenario())
    assert workflow_transitions(db) == [("pending", "cancelled")]


def test_a_running_workflow_stops_at_the_next_step_boundary_and_its_step_sees_the_request(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start(lease_seconds=0.6)
    insert_workflows(db, "cancellable", 1, sleep=3)
    wait_until(lambda: effects(db, "one") == 1, 15, "the first step to start")

    async def cancel() -> None:
        async with WorkflowService.connect(db_url) as service:
            (workflow,) = (await service.list_workflows()).items
            flagged = await service.cancel_workflow(workflow.id)
            assert flagged.state is WorkflowState.RUNNING
            assert flagged.cancel_requested
            finished = await service.wait_for(workflow.id, timeout=15)
            assert finished.state is WorkflowState.CANCELLED

    asyncio.run(cancel())
    assert step_states(db) == {"one": "completed", "two": "skipped", "three": "skipped"}
    saw = db.execute("SELECT output->>'saw_cancel' FROM workflow_steps WHERE step_name = 'one'").fetchone()
    assert saw == ("true",)
    assert effects(db, "two") == 0
    assert_timeline_is_legal(db)


def test_a_cancelled_saga_compensates(daemons: Daemons, db: psycopg.Connection[Any], db_url: str) -> None:
    db.execute("INSERT INTO test_switches VALUES ('break:charge')")  # charge keeps retrying
    daemons.start()
    insert_workflows(db, "cancellable_saga", 1)
    wait_until(lambda: effects(db, "charge") >= 1, 15, "charge to fail once")

    async def cancel() -> WorkflowState:
        async with WorkflowService.connect(db_url) as service:
            (workflow,) = (await service.list_workflows()).items
            await service.cancel_workflow(workflow.id)
            return (await service.wait_for(workflow.id, timeout=15)).state

    assert asyncio.run(cancel()) is WorkflowState.COMPENSATED
    assert step_states(db)["reserve"] == "compensated"
    assert effects(db, "undo:reserve") == 1
    assert ("running", "cancelled") in workflow_transitions(db)
    assert ("cancelled", "compensating") in workflow_transitions(db)


def test_cancel_racing_with_step_commits_always_ends_in_a_legal_state(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    for _ in range(2):
        daemons.start(lease_seconds=1)
    insert_workflows(db, "cancellable", 40, sleep=0.05)
    insert_workflows(db, "cancellable_saga", 20)
    ids = [row[0] for row in db.execute("SELECT id FROM workflows").fetchall()]
    rng = random.Random(7)

    async def cancel_all() -> None:
        async with WorkflowService.connect(db_url) as service:
            for workflow_id in rng.sample(ids, len(ids)):
                await asyncio.sleep(rng.uniform(0, 0.02))
                with contextlib.suppress(IllegalTransitionError):  # it finished first: legal too
                    await service.cancel_workflow(workflow_id)

    asyncio.run(cancel_all())
    wait_until(lambda: sum(states(db).get(state, 0) for state in ("completed", "cancelled", "compensated")) == 60, 40,
               f"every workflow to finish (now {states(db)})")  # fmt: skip
    assert db.execute("SELECT count(*) FROM workflows WHERE locked_by IS NOT NULL").fetchone() == (0,)
    # A cancelled workflow ran none of its steps after the boundary where it stopped.
    assert db.execute(
        "SELECT count(*) FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id "
        "WHERE w.state = 'cancelled' AND s.state NOT IN ('completed', 'skipped', 'failed')"
    ).fetchone() == (0,)
    commits = db.execute(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM workflow_events WHERE to_state = 'completed' "
        "AND step_index IS NOT NULL GROUP BY workflow_id, step_index) c"
    ).fetchone()
    assert commits in ((1,), (None,))
    # The race happened: some workflows were stopped between steps, after their first
    # step had committed, and some finished before their cancel arrived.
    stopped_midway = db.execute(
        "SELECT count(DISTINCT w.id) FROM workflows w JOIN workflow_steps s ON s.workflow_id = w.id "
        "WHERE w.state IN ('cancelled', 'compensated') AND s.state IN ('completed', 'compensated')"
    ).fetchone()
    assert stopped_midway is not None
    assert stopped_midway[0] > 0
    assert states(db).get("cancelled", 0) + states(db).get("compensated", 0) > 0
    assert_timeline_is_legal(db)


def test_a_manual_retry_resumes_at_the_failed_step_without_rerunning_completed_ones(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    db.execute("INSERT INTO test_switches VALUES ('break:charge')")
    daemons.start()
    insert_workflows(db, "plain_failing", 1)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    assert effects(db, "reserve") == 1
    db.execute("DELETE FROM test_switches")

    async def retry() -> WorkflowState:
        async with WorkflowService.connect(db_url) as service:
            (workflow,) = (await service.list_workflows()).items
            retried = await service.retry_workflow(workflow.id)
            assert retried.state is WorkflowState.PENDING
            assert retried.error is None
            finished = await service.wait_for(workflow.id, timeout=20)
            steps = await service.get_steps(workflow.id)
            # The failed step's counters were reset: it succeeded on its first retry-free try.
            assert (steps[1].retry_count, steps[1].error) == (0, None)
            timeline = await service.get_timeline(workflow.id)
            assert ("charge", "failed", "pending") in [
                (e.step_name, e.from_state, e.to_state) for e in timeline
            ]
            return finished.state

    assert asyncio.run(retry()) is WorkflowState.COMPLETED
    assert effects(db, "reserve") == 1  # not run again
    assert effects(db, "charge") == 2
    assert db.execute("SELECT retry_count FROM workflows").fetchone() == (1,)
    assert_timeline_is_legal(db)


def test_retry_and_cancel_are_refused_in_other_states(db_url: str, db: psycopg.Connection[Any]) -> None:
    db.execute("INSERT INTO workflows (type, input, user_id, state) VALUES ('t', '{}', 'u', 'completed')")

    async def scenario() -> None:
        async with WorkflowService.connect(db_url) as service:
            (workflow,) = (await service.list_workflows()).items
            with pytest.raises(IllegalTransitionError, match="cannot go from completed to pending"):
                await service.retry_workflow(workflow.id)
            with pytest.raises(IllegalTransitionError, match="cannot go from completed to cancelled"):
                await service.cancel_workflow(workflow.id)
            with pytest.raises(IllegalTransitionError, match="cannot go from completed to compensating"):
                await service.compensate_workflow(workflow.id)

    asyncio.run(scenario())


def test_a_transactional_step_writes_exactly_once_across_20_kill_9_cycles(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    # Quick steps commit between kills; slow ones outlast every victim (killed 0.1-0.6 s
    # after it starts), so their transactions are always cut off mid-step.
    insert_workflows(db, "ledger", 6, amount=10, sleep=0.2)
    insert_workflows(db, "ledger", 6, amount=10, sleep=1.2)
    rng = random.Random(11)
    for _ in range(20):
        victim = daemons.start(lease_seconds=0.5, poll_interval=0.05)
        time.sleep(rng.uniform(0.1, 0.6))
        victim.signal(signal.SIGKILL)
        victim.process.wait(timeout=5)
    daemons.start(lease_seconds=0.5, poll_interval=0.05)
    wait_until(lambda: all_finished(db, 12), 60, "every ledger workflow to complete")
    per_workflow = db.execute(
        "SELECT w.id, count(l.workflow_id) FROM workflows w LEFT JOIN test_ledger l ON l.workflow_id = w.id GROUP BY w.id"
    ).fetchall()
    assert {count for _, count in per_workflow} == {1}, "every ledger write committed exactly once"
    assert db.execute("SELECT sum(amount) FROM test_ledger").fetchone() == (120,)
    # The kills really interrupted transactional steps: they ran more often than they committed.
    assert effects(db, "credit") > 12
    assert_invariants(db, expected_completed=12, daemons=daemons.all_but(*daemons.started[:-1]))


def test_a_transactional_step_of_a_stale_worker_rolls_back(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    stale = daemons.start(lease_seconds=1)
    insert_workflows(db, "ledger", 1, amount=5, sleep=1.5)
    wait_until(lambda: effects(db, "credit") == 1, 15, "the step to start")
    stale.signal(signal.SIGSTOP)
    daemons.start(lease_seconds=1)
    wait_until(lambda: all_finished(db, 1), 30, "the other daemon to finish")
    stale.signal(signal.SIGCONT)
    wait_until(
        lambda: any(e["event"] == "lease_lost" for e in stale.log_events()), 15, "the stale worker to give up"
    )
    assert db.execute("SELECT count(*), sum(amount) FROM test_ledger").fetchone() == (1, 5)
    assert_invariants(db, expected_completed=1, daemons=daemons.all_but())


def test_a_transactional_steps_own_sql_plans_as_configured_and_its_completion_lands(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    insert_workflows(db, "ledger", 2, amount=5)
    wait_until(lambda: all_finished(db, 2, "completed"), 20, "the ledger workflows to complete")
    assert db.execute("SELECT DISTINCT output->>'seqscan' FROM workflows").fetchall() == [("on",)]
    assert db.execute("SELECT count(*) FROM test_ledger").fetchone() == (2,)


def test_a_failing_transactional_step_leaves_no_write(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    daemons.start()
    insert_workflows(db, "ledger", 1, amount=5, fail=True)
    wait_until(lambda: all_finished(db, 1, "failed"), 20, "the workflow to fail")
    assert db.execute("SELECT count(*) FROM test_ledger").fetchone() == (0,)


def test_an_unserved_type_stays_pending_and_is_reported_by_stats(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    insert_workflows(db, "served_by_nobody", 2)
    insert_workflows(db, "three_steps", 1)
    wait_until(lambda: states(db).get("completed") == 1, 20, "the served workflow to complete")
    time.sleep(0.5)  # a few more polls: nobody claims the unserved ones

    async def stats() -> Any:
        async with WorkflowService.connect(db_url) as service:
            return await service.get_stats()

    overview = asyncio.run(stats())
    assert states(db) == {"completed": 1, "pending": 2}
    assert db.execute(
        "SELECT count(*) FROM workflows WHERE type = 'served_by_nobody' AND locked_by IS NULL"
    ).fetchone() == (2,)
    assert overview.unserved_types == ["served_by_nobody"]
    assert overview.by_type["served_by_nobody"] == {"pending": 2}
    assert overview.by_state == {"completed": 1, "pending": 2}
    assert overview.completed_last_minute == 1
    assert overview.oldest_due_age_seconds is not None
    assert overview.oldest_due_age_seconds > 0
    assert [worker.pid for worker in overview.live_workers] == [daemons.started[0].pid]


def test_a_completed_workflow_has_its_whole_timeline_in_order_and_a_full_summary(
    daemons: Daemons, db_url: str
) -> None:
    daemons.start()

    async def scenario() -> None:
        async with WorkflowService.connect(db_url) as service:
            started = await service.start_workflow("three_steps", {"sleep": 0}, "u-search", "0xwallet")
            finished = await service.wait_for(started.id, timeout=20)
            assert finished.state is WorkflowState.COMPLETED
            timeline = await service.get_timeline(started.id)
            assert [(e.step_name, e.from_state, e.to_state) for e in timeline] == [
                (None, "pending", "running"),
                ("first", "pending", "running"), ("first", "running", "completed"),
                ("second", "pending", "running"), ("second", "running", "completed"),
                ("third", "pending", "running"), ("third", "running", "completed"),
                (None, "running", "completed"),
            ]  # fmt: skip
            assert all(e.worker_id for e in timeline)
            assert [e.at for e in timeline] == sorted(e.at for e in timeline)
            summary = await service.get_execution_summary(started.id)
            assert (summary.progress_percentage, summary.completed_steps, summary.current_step) == (
                100.0,
                3,
                None,
            )

    asyncio.run(scenario())


def test_search_finds_a_workflow_by_each_of_its_keys_and_an_injection_finds_nothing(db_url: str) -> None:
    async def scenario() -> None:
        async with WorkflowService.connect(db_url) as service:
            started = await service.start_workflow("three_steps", {"sleep": 0}, "u-search", "0xwallet")
            for q in (str(started.id), started.idempotency_key, "u-search", "0xwallet", "three_steps"):
                assert [w.id for w in await service.search_workflows(q)] == [started.id], q
            assert await service.search_workflows("'; DROP TABLE workflows; --") == []

    asyncio.run(scenario())


def test_wait_for_times_out_on_a_workflow_nobody_runs(db_url: str) -> None:
    async def scenario() -> None:
        async with WorkflowService.connect(db_url) as service:
            pending = await service.start_workflow("served_by_nobody", {}, "u")
            with pytest.raises(TimeoutError):
                await service.wait_for(pending.id, timeout=0.3)

    asyncio.run(scenario())
