"""What the service returns: workflows and steps as stored, and summaries of them.

Pydantic models, so that the CLI and the HTTP API print them as JSON the same way
(`record.model_dump(mode="json")`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from engine.limits import RateLimit
from engine.states import StepState, WorkflowState


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class WorkflowRecord(_Record):
    """One row of `workflows`."""

    id: UUID
    idempotency_key: str
    type: str
    # The version of its type's definition it runs under; None until its first claim
    # when a SQL insert left it out.
    version: int | None = None
    state: WorkflowState
    user_id: str | None
    wallet_address: str | None
    input: Any
    output: Any | None
    context: dict[str, Any]
    current_step_index: int
    total_steps: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    retry_count: int
    max_retries: int
    requires_compensation: bool
    is_compensated: bool
    error: dict[str, Any] | None
    next_retry_at: datetime
    locked_by: str | None
    lease_expires_at: datetime | None
    lease_token: UUID | None
    cancel_requested: bool
    priority: int


class StepRecord(_Record):
    """One row of `workflow_steps`."""

    # The step row's own id (the seed's schema); None for a row made before migration
    # 0010 and not backfilled since.
    id: UUID | None = None
    workflow_id: UUID
    step_index: int
    step_name: str
    state: StepState
    input: Any | None
    output: Any | None
    config: dict[str, Any]
    retry_count: int
    max_retries: int
    requires_compensation: bool
    is_compensated: bool
    is_idempotent: bool
    idempotency_key: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    next_retry_at: datetime | None
    error: dict[str, Any] | None
    attempt: int


class StartResult(_Record):
    """The workflow a start maps to, and whether this start created it."""

    workflow: WorkflowRecord
    created: bool


class WorkflowPage(_Record):
    """One page of a listing, with the total number of matching workflows."""

    items: list[WorkflowRecord]
    page: int
    limit: int
    total: int


class StepSummary(_Record):
    """A step's place in an execution summary."""

    index: int
    name: str
    state: StepState
    attempt: int
    retry_count: int
    duration_seconds: float | None
    error: dict[str, Any] | None


class ExecutionSummary(_Record):
    """How far a workflow has come: the seed's execution summary."""

    id: UUID
    type: str
    state: WorkflowState
    completed_steps: int
    total_steps: int
    progress_percentage: float
    current_step: str | None
    current_step_index: int
    retries: int
    duration_seconds: float | None
    last_error: dict[str, Any] | None
    steps: list[StepSummary]


class TimelineEvent(_Record):
    """One transition of a workflow (step_index None) or of one of its steps."""

    id: int
    workflow_id: UUID
    step_index: int | None
    step_name: str | None
    from_state: str | None
    to_state: str
    attempt: int | None
    worker_id: str | None
    # The operator whose command made the transition (cancel, retry, compensate), e.g.
    # "admin-api:10.0.0.7" or "cli:alice"; None for what a worker did on its own.
    actor: str | None
    error: dict[str, Any] | None
    at: datetime


class WorkerInfo(_Record):
    """A live daemon."""

    id: str
    host: str
    pid: int
    types: list[str]
    concurrency: int
    started_at: datetime
    last_seen_at: datetime


class VersionUsage(_Record):
    """One version of a type's definition, as the database knows it (`workflowd versions`)."""

    type: str
    # None: workflows inserted by SQL and not claimed yet (they take the newest version
    # the daemon that claims them serves).
    version: int | None
    in_flight: int
    finished: int
    # Live workers that serve this version: 0 with work in flight means it waits.
    served_by: int


class TypeFlow(_Record):
    """One type as flow control sees it (the type_flow query): its workflows holding a
    lease against its concurrency limit, its steps started in the last period of its
    rate ("10/s") against the rate, its due workflows, how many of those a limit holds
    back now (throttled: limited, not stuck), and how long the oldest has been due."""

    type: str
    in_flight: int
    max_concurrency: int | None
    rate_limit: str | None
    # The rate as numbers: step starts per period, and the period.
    rate_limit_starts: int | None
    rate_period_seconds: float | None
    started_in_period: int
    due: int
    throttled: int
    oldest_due_age_seconds: float | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> TypeFlow:
        """From a type_flow row, its rate as a count and a period in seconds."""
        text = _rate_text(row["rate_limit"], row["rate_period_seconds"])
        return cls.model_validate(row | {"rate_limit": text, "rate_limit_starts": row["rate_limit"]})


class WorkflowStats(_Record):
    """The overview an operator looks at first."""

    by_state: dict[str, int]
    by_type: dict[str, dict[str, int]]
    completed_last_minute: int
    failed_last_minute: int
    completed_last_hour: int
    failed_last_hour: int
    oldest_due_age_seconds: float | None
    live_workers: list[WorkerInfo]
    # Served keys (`type`, or `type@N` for version N) with due work and no live worker.
    unserved_types: list[str]
    # Running or compensating workflows due or leased more than an hour ahead: no daemon
    # claims them as they stand (see the count_stuck_workflows query).
    stuck_workflows: int = 0
    # Each type with runnable work or a limit, as flow control sees it.
    flow: list[TypeFlow] = []


class LimitRecord(_Record):
    """A type's limits (`workflow_type_limits`), as the API and the CLI show them: those
    that hold (None: none), its definition's, whether an operator set any, and now: how
    many of its workflows hold a lease, how many steps it started in the last period of
    its rate, and how many workflows are due and wait. A rate reads as "10/s"."""

    type: str
    max_concurrency: int | None
    declared_max_concurrency: int | None
    rate_limit: str | None = None
    declared_rate_limit: str | None = None
    overridden: bool
    set_by: str | None
    set_at: datetime | None
    in_flight: int
    started_in_period: int = 0
    due: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> LimitRecord:
        """From a list_limits row, its rates as counts and periods in seconds."""
        rate = _rate_text(row["rate_limit"], row["rate_period_seconds"])
        declared = _rate_text(row["declared_rate_limit"], row["declared_rate_period_seconds"])
        return cls.model_validate(row | {"rate_limit": rate, "declared_rate_limit": declared})


def _rate_text(count: int | None, period_seconds: float | None) -> str | None:
    if count is None or period_seconds is None:
        return None
    return str(RateLimit(count, period_seconds))


class ScheduleRecord(_Record):
    """A cron schedule (`workflow_schedules`), as the API and the CLI show it."""

    name: str
    cron: str
    timezone: str
    type: str
    input: dict[str, Any]
    user_id: str | None
    missed: str
    enabled: bool
    declared: bool
    next_fire_at: datetime
    last_fired_at: datetime | None
    last_workflow_id: UUID | None
    last_fired_by: str | None
