"""The workflow engine: definitions, states, retry policy, idempotency and the store.

Import the definition API and the service from here:

    from engine import Workflow, Step, WorkflowContext, WorkflowService
"""

from engine.definitions import Step, Workflow, WorkflowContext
from engine.errors import (
    DefinitionError,
    EventRefusedError,
    IdempotencyKeyConflictError,
    IllegalTransitionError,
    InputValidationError,
    InvalidLimitError,
    InvalidPriorityError,
    InvalidStartTimeError,
    InvalidWorkflowIdError,
    MigrationError,
    NotExecuted,
    PermanentError,
    PriorityRefusedError,
    Snooze,
    UnservedTypeError,
    UnstorableValueError,
    VersionMismatchError,
    WorkflowEngineError,
    WorkflowNotFoundError,
)
from engine.idempotency import canonical_json, step_idempotency_key, workflow_idempotency_key
from engine.records import (
    ExecutionSummary,
    StartResult,
    StepRecord,
    TimelineEvent,
    WorkerInfo,
    WorkflowPage,
    WorkflowRecord,
    WorkflowStats,
)
from engine.registry import Registry
from engine.retry import RetryPolicy, next_retry_time, should_retry
from engine.schedules import Schedule, ScheduleError, ScheduleNotFoundError
from engine.service import WorkflowService
from engine.states import StepState, WorkflowState

__all__ = [
    "DefinitionError",
    "EventRefusedError",
    "ExecutionSummary",
    "IdempotencyKeyConflictError",
    "IllegalTransitionError",
    "InputValidationError",
    "InvalidLimitError",
    "InvalidPriorityError",
    "InvalidStartTimeError",
    "InvalidWorkflowIdError",
    "MigrationError",
    "NotExecuted",
    "PermanentError",
    "PriorityRefusedError",
    "Registry",
    "RetryPolicy",
    "Schedule",
    "ScheduleError",
    "ScheduleNotFoundError",
    "Snooze",
    "StartResult",
    "Step",
    "StepRecord",
    "StepState",
    "TimelineEvent",
    "UnservedTypeError",
    "UnstorableValueError",
    "VersionMismatchError",
    "WorkerInfo",
    "Workflow",
    "WorkflowContext",
    "WorkflowEngineError",
    "WorkflowNotFoundError",
    "WorkflowPage",
    "WorkflowRecord",
    "WorkflowService",
    "WorkflowState",
    "WorkflowStats",
    "canonical_json",
    "next_retry_time",
    "should_retry",
    "step_idempotency_key",
    "workflow_idempotency_key",
]
