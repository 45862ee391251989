"""The execution summary computed from workflow and step records and the definition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine import Step, StepRecord, StepState, Workflow, WorkflowRecord, WorkflowState
from engine.summary import summarize

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
WORKFLOW_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DONE = {StepState.COMPLETED, StepState.COMPENSATING, StepState.COMPENSATED}


def workflow_record(**overrides: Any) -> WorkflowRecord:
    values: dict[str, Any] = {
        "id": WORKFLOW_ID,
        "idempotency_key": "workflow:flow:u:" + "0" * 64,
        "type": "flow",
        "state": WorkflowState.RUNNING,
        "user_id": "u",
        "wallet_address": None,
        "input": {},
        "output": None,
        "context": {},
        "current_step_index": 0,
        "total_steps": 3,
        "created_at": T0,
        "updated_at": T0,
        "started_at": T0,
        "completed_at": None,
        "retry_count": 0,
        "max_retries": 3,
        "requires_compensation": False,
        "is_compensated": False,
        "error": None,
        "next_retry_at": T0,
        "locked_by": None,
        "lease_expires_at": None,
        "lease_token": None,
        "cancel_requested": False,
        "priority": 0,
    }
    values.update(overrides)
    return WorkflowRecord(**values)


def step_record(index: int, name: str, state: StepState, **overrides: Any) -> StepRecord:
    values: dict[str, Any] = {
        "workflow_id": WORKFLOW_ID,
        "step_index": index,
        "step_name": name,
        "state": state,
        "input": None,
        "output": None,
        "config": {},
        "retry_count": 0,
        "max_retries": 3,
        "requires_compensation": False,
        "is_compensated": False,
        "is_idempotent": True,
        "idempotency_key": f"step:{name}:" + "0" * 64,
        "created_at": T0,
        "updated_at": T0,
        "started_at": None,
        "completed_at": None,
        "next_retry_at": None,
        "error": None,
        "attempt": 0,
    }
    values.update(overrides)
    return StepRecord(**values)


def definition(*names: str) -> Workflow:
    return Workflow(type="flow", steps=[Step(name=name, execute=print) for name in names])


FLOW = definition("reserve", "charge", "ship", "notify")


def test_progress_current_step_and_retries_of_a_running_workflow() -> None:
    steps = [
        step_record(0, "reserve", StepState.COMPLETED, retry_count=1, attempt=2),
        step_record(1, "charge", StepState.COMPLETED),
        step_record(2, "ship", StepState.RUNNING, retry_count=2, attempt=3),
        step_record(3, "notify", StepState.PENDING),
    ]
    workflow = workflow_record(total_steps=4, current_step_index=2)
    summary = summarize(workflow, steps, FLOW, now=T0 + timedelta(seconds=90))
    assert summary.id == WORKFLOW_ID
    assert summary.type == "flow"
    assert summary.state is WorkflowState.RUNNING
    assert summary.completed_steps == 2
    assert summary.total_steps == 4
    assert summary.progress_percentage == 50.0
    assert summary.current_step == "ship"
    assert summary.current_step_index == 2
    assert summary.retries == 3
    assert summary.duration_seconds == 90.0
    assert summary.last_error is None
    assert [(s.index, s.name, s.state) for s in summary.steps] == [
        (0, "reserve", StepState.COMPLETED),
        (1, "charge", StepState.COMPLETED),
        (2, "ship", StepState.RUNNING),
        (3, "notify", StepState.PENDING),
    ]
    assert (summary.steps[2].attempt, summary.steps[2].retry_count) == (3, 2)


def test_progress_is_rounded_to_one_decimal() -> None:
    names = ["a", "b", "c"]
    for done, expected in [(0, 0.0), (1, 33.3), (2, 66.7)]:
        steps = [
            step_record(i, name, StepState.COMPLETED if i < done else StepState.PENDING)
            for i, name in enumerate(names)
        ]
        workflow = workflow_record(total_steps=3, current_step_index=done)
        summary = summarize(workflow, steps, None, now=T0)
        assert summary.progress_percentage == expected
        assert summary.current_step == names[done]


def test_before_any_step_row_the_definition_names_the_steps() -> None:
    workflow = workflow_record(state=WorkflowState.PENDING, total_steps=4, started_at=None)
    summary = summarize(workflow, [], FLOW, now=T0)
    assert summary.current_step == "reserve"
    assert summary.current_step_index == 0
    assert summary.completed_steps == 0
    assert summary.total_steps == 4
    assert summary.progress_percentage == 0.0
    assert summary.retries == 0
    assert summary.duration_seconds is None
    assert summary.steps == []


def test_without_a_total_the_definition_gives_it() -> None:
    workflow = workflow_record(state=WorkflowState.PENDING, total_steps=0, started_at=None)
    summary = summarize(workflow, [], FLOW, now=T0)
    assert summary.total_steps == 4
    assert summary.current_step == "reserve"


def test_with_neither_rows_nor_definition_nothing_is_known() -> None:
    workflow = workflow_record(state=WorkflowState.PENDING, total_steps=0, started_at=None)
    summary = summarize(workflow, [], None, now=T0)
    assert summary.total_steps == 0
    assert summary.progress_percentage == 0.0
    assert summary.current_step is None


def test_a_completed_workflow_is_at_one_hundred_percent() -> None:
    steps = [
        step_record(0, "a", StepState.COMPLETED, started_at=T0, completed_at=T0 + timedelta(seconds=1)),
        step_record(1, "b", StepState.SKIPPED),
    ]
    workflow = workflow_record(
        state=WorkflowState.COMPLETED,
        total_steps=2,
        current_step_index=2,
        completed_at=T0 + timedelta(seconds=2.5),
    )
    summary = summarize(workflow, steps, None, now=T0 + timedelta(days=1))
    assert summary.completed_steps == 2
    assert summary.progress_percentage == 100.0
    assert summary.current_step is None
    assert summary.duration_seconds == 2.5
    assert summary.steps[0].duration_seconds == 1.0
    assert summary.steps[1].duration_seconds is None


def test_a_finished_workflow_has_no_current_step() -> None:
    steps = [step_record(0, "a", StepState.COMPLETED), step_record(1, "b", StepState.FAILED)]
    for state in (
        WorkflowState.FAILED,
        WorkflowState.CANCELLED,
        WorkflowState.COMPENSATING,
        WorkflowState.COMPENSATED,
    ):
        workflow = workflow_record(state=state, total_steps=2, current_step_index=1)
        summary = summarize(workflow, steps, None, now=T0)
        assert summary.current_step is None, state
        assert summary.current_step_index == 1


def test_compensated_steps_still_count_as_done() -> None:
    steps = [
        step_record(0, "a", StepState.COMPENSATED),
        step_record(1, "b", StepState.COMPENSATING),
        step_record(2, "c", StepState.FAILED),
    ]
    workflow = workflow_record(state=WorkflowState.COMPENSATING, total_steps=3, current_step_index=2)
    summary = summarize(workflow, steps, None, now=T0)
    assert summary.completed_steps == 2
    assert summary.progress_percentage == 66.7


def test_a_current_index_past_the_steps_names_no_step() -> None:
    steps = [step_record(0, "a", StepState.COMPLETED)]
    workflow = workflow_record(total_steps=1, current_step_index=1)
    assert summarize(workflow, steps, None, now=T0).current_step is None


def test_the_last_error_is_the_workflows_else_the_latest_steps() -> None:
    first = {"message": "timeout", "attempt": 1}
    second = {"message": "declined", "attempt": 2}
    steps = [
        step_record(0, "a", StepState.COMPLETED, error=first, retry_count=1),
        step_record(1, "b", StepState.FAILED, error=second, retry_count=3),
        step_record(2, "c", StepState.PENDING),
    ]
    running = workflow_record(total_steps=3, current_step_index=1)
    summary = summarize(running, steps, None, now=T0)
    assert summary.last_error == second
    assert summary.retries == 4
    assert [s.error for s in summary.steps] == [first, second, None]

    failed = workflow_record(
        state=WorkflowState.FAILED,
        total_steps=3,
        current_step_index=1,
        error={"message": "gave up"},
    )
    assert summarize(failed, steps, None, now=T0).last_error == {"message": "gave up"}


def test_a_running_duration_is_counted_to_now() -> None:
    steps = [step_record(0, "a", StepState.RUNNING, started_at=T0 + timedelta(seconds=1))]
    workflow = workflow_record(total_steps=1)
    summary = summarize(workflow, steps, None, now=T0 + timedelta(seconds=3.25))
    assert summary.duration_seconds == 3.25
    assert summary.steps[0].duration_seconds == 2.25


def test_without_now_the_current_time_is_used() -> None:
    workflow = workflow_record(total_steps=1, started_at=datetime.now(UTC) - timedelta(seconds=5))
    summary = summarize(workflow, [], definition("a"))
    assert summary.duration_seconds is not None
    assert 5.0 <= summary.duration_seconds < 65.0


def test_the_summary_serialises_to_json() -> None:
    steps = [step_record(0, "a", StepState.COMPLETED)]
    summary = summarize(
        workflow_record(total_steps=2, current_step_index=1), steps, definition("a", "b"), now=T0
    )
    dumped = summary.model_dump(mode="json")
    assert dumped["id"] == str(WORKFLOW_ID)
    assert dumped["state"] == "running"
    assert dumped["steps"][0]["state"] == "completed"
    assert dumped["progress_percentage"] == 50.0


@given(
    states=st.lists(st.sampled_from(StepState), min_size=1, max_size=12),
    retry_counts=st.lists(st.integers(0, 5), min_size=12, max_size=12),
)
def test_progress_counts_the_steps_whose_forward_work_is_done(
    states: list[StepState], retry_counts: list[int]
) -> None:
    steps = [step_record(i, f"s{i}", state, retry_count=retry_counts[i]) for i, state in enumerate(states)]
    workflow = workflow_record(total_steps=len(states))
    summary = summarize(workflow, steps, None, now=T0)
    done = sum(1 for state in states if state in DONE)
    assert summary.completed_steps == done
    assert summary.progress_percentage == round(100.0 * done / len(states), 1)
    assert 0.0 <= summary.progress_percentage <= 100.0
    assert summary.retries == sum(retry_counts[: len(states)])
