"""The operator's commands through WorkflowService: who asked is in the timeline, and a
failure whose outcome is unknown is retried only with force."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import IllegalTransitionError, WorkflowService, WorkflowState
from tests.factories import insert_outcome_unknown_failure, insert_step, insert_workflow


async def test_retrying_an_outcome_unknown_failure_needs_force(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    staged = insert_outcome_unknown_failure(db)
    with pytest.raises(IllegalTransitionError) as refused:
        await service.retry_workflow(staged["id"], actor="ops")
    message = str(refused.value)
    assert "cannot go from failed to pending" in message
    assert "'transfer' must not run twice" in message
    assert "may have taken effect" in message
    assert "check the outside service, then retry with force" in message
    untouched = await service.get_workflow(staged["id"])
    assert untouched.state is WorkflowState.FAILED
    assert untouched.error == staged["error"]
    assert await service.get_timeline(staged["id"]) == []

    retried = await service.retry_workflow(staged["id"], force=True, actor="ops")
    assert retried.state is WorkflowState.PENDING
    assert retried.error is None
    steps = await service.get_steps(staged["id"])
    assert (steps[0].state, steps[0].error) == ("pending", None)
    events = await service.get_timeline(staged["id"])
    assert [(e.step_name, e.from_state, e.to_state, e.actor) for e in events] == [
        (None, "failed", "pending", "ops"),
        ("transfer", "failed", "pending", "ops"),
    ]


async def test_other_failures_are_retried_without_force(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    failed = insert_workflow(db, state="failed", total_steps=1, error={"type": "Timeout", "message": "slow"})
    insert_step(db, failed, 0, "call", state="failed", attempt=3, error={"type": "Timeout"})
    assert (await service.retry_workflow(failed["id"])).state is WorkflowState.PENDING
    events = await service.get_timeline(failed["id"])
    assert {event.actor for event in events} == {None}  # no actor given, none recorded


async def test_cancel_and_compensate_record_their_actor(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    pending = insert_workflow(db, total_steps=2)
    insert_step(db, pending, 0, "one")
    insert_step(db, pending, 1, "two")
    cancelled = await service.cancel_workflow(pending["id"], actor="cli:alice")
    assert cancelled.state is WorkflowState.CANCELLED
    compensated = await service.compensate_workflow(pending["id"], actor="admin-api:10.0.0.7")
    assert compensated.state is WorkflowState.COMPENSATED  # nothing had completed
    events = await service.get_timeline(pending["id"])
    assert [(e.step_name, e.from_state, e.to_state, e.actor) for e in events] == [
        (None, "pending", "cancelled", "cli:alice"),
        ("one", "pending", "skipped", "cli:alice"),
        ("two", "pending", "skipped", "cli:alice"),
        (None, "cancelled", "compensating", "admin-api:10.0.0.7"),
        (None, "compensating", "compensated", "admin-api:10.0.0.7"),
    ]


async def test_cancelling_a_retried_saga_records_the_actor_of_its_compensation(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    # A pending workflow that ran before (a manual retry) undoes its completed steps
    # when cancelled: the compensation's events carry the same actor.
    saga = insert_workflow(db, total_steps=2, current_step_index=1, requires_compensation=True)
    insert_step(db, saga, 0, "reserve", state="completed", attempt=1, requires_compensation=True)
    insert_step(db, saga, 1, "charge", state="pending")
    assert (await service.cancel_workflow(saga["id"], actor="ops")).state is WorkflowState.COMPENSATING
    events = await service.get_timeline(saga["id"])
    assert [(e.from_state, e.to_state, e.actor) for e in events if e.step_index is None] == [
        ("pending", "cancelled", "ops"),
        ("cancelled", "compensating", "ops"),
    ]
