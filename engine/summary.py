"""The execution summary: how far a workflow has come, from its rows and its definition."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from engine.definitions import Workflow
from engine.records import ExecutionSummary, StepRecord, StepSummary, WorkflowRecord
from engine.states import StepState, WorkflowState

# Steps whose forward work is done, whatever happened to them afterwards.
_DONE_STEP_STATES = frozenset({StepState.COMPLETED, StepState.COMPENSATING, StepState.COMPENSATED})


def _seconds(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return round(((end or now) - start).total_seconds(), 3)


def _step_names(
    workflow: WorkflowRecord, steps: Sequence[StepRecord], definition: Workflow | None
) -> list[str]:
    # Step rows exist from the first claim on; before that the definition names them.
    if steps:
        return [step.step_name for step in steps]
    if definition is not None:
        return [step.name for step in definition.steps]
    return []


def completed_steps(workflow: WorkflowRecord, steps: Sequence[StepRecord]) -> int:
    """How many of a workflow's steps did their forward work, whatever happened to them
    afterwards (a compensated step was completed first): the count every view shows."""
    if workflow.state is WorkflowState.COMPLETED:
        return workflow.total_steps or len(steps)
    return sum(1 for step in steps if step.state in _DONE_STEP_STATES)


def summarize(
    workflow: WorkflowRecord,
    steps: Sequence[StepRecord],
    definition: Workflow | None,
    now: datetime | None = None,
) -> ExecutionSummary:
    """Progress (completed of total, as a percentage), current step, durations, retries."""
    now = now or datetime.now(UTC)
    names = _step_names(workflow, steps, definition)
    total = workflow.total_steps or len(names)
    completed = completed_steps(workflow, steps)
    active = workflow.state in (WorkflowState.PENDING, WorkflowState.RUNNING)
    index = workflow.current_step_index
    current = names[index] if active and index < len(names) else None
    errors = [step.error for step in steps if step.error] + ([workflow.error] if workflow.error else [])
    return ExecutionSummary(
        id=workflow.id,
        type=workflow.type,
        state=workflow.state,
        completed_steps=completed,
        total_steps=total,
        progress_percentage=round(100.0 * completed / total, 1) if total else 0.0,
        current_step=current,
        current_step_index=index,
        retries=sum(step.retry_count for step in steps),
        duration_seconds=_seconds(workflow.started_at, workflow.completed_at, now),
        last_error=workflow.error or (errors[-1] if errors else None),
        steps=[
            StepSummary(
                index=step.step_index,
                name=step.step_name,
                state=step.state,
                attempt=step.attempt,
                retry_count=step.retry_count,
                duration_seconds=_seconds(step.started_at, step.completed_at, now),
                error=step.error,
            )
            for step in steps
        ],
    )
