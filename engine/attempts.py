"""What a claimed workflow is to do now: the rules of an attempt, in one pure function.

The claim statement (sql/queries/claim.sql, claim_due_workflows) has already started the
current step when it may run: a fresh or scheduled step, or an interrupted idempotent
one with retries left. `decide` reads the claimed row and the definition and says
whether to run that attempt, to cancel at this step boundary, or to refuse the workflow
with a failure (and which). No database here: the worker acts on the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from engine.definitions import Workflow
from engine.errors import OUTCOME_UNKNOWN, InputValidationError
from engine.idempotency import step_input_digest
from engine.runner import StepFailed, failure


@dataclass(frozen=True, slots=True)
class ClaimedWorkflow:
    """A row of claim_due_workflows: a workflow this worker now holds the lease of.

    `input_text` and `context_text` are the JSON text of the stored values, decoded by
    `decide`, so that one row Python cannot read fails alone. `previous_step_state` is
    the current step's state before the claim (None: no step rows yet, a first claim);
    `step_started` whether the claim started an attempt of it (or of its compensation);
    `attempt` and `retry_count` count the forward attempts, or the compensation's.
    `traceparent`: the W3C trace context its starter stored (None: untraced), which the
    run's spans continue.
    """

    id: UUID
    type: str
    # The definition's version the workflow runs under (workflow_run_version: 1 for one the
    # release before versions started); None until its first claim when a SQL insert left
    # it out (the claim then picks the newest the daemon serves).
    version: int | None
    state: str
    previous_state: str
    input_text: str
    context_text: str
    user_id: str | None
    wallet_address: str | None
    idempotency_key: str
    current_step_index: int
    lease_token: UUID
    cancel_requested: bool
    pickup_lag_seconds: float
    previous_step_state: str | None
    step_is_idempotent: bool | None
    attempt: int | None
    retry_count: int | None
    step_started: bool
    traceparent: str | None = None

    @property
    def compensating(self) -> bool:
        return self.state == "compensating"

    @property
    def first_claim(self) -> bool:
        """Whether the workflow has no step rows yet (inserted, never claimed)."""
        return self.previous_step_state is None


@dataclass(frozen=True, slots=True)
class Run:
    """Run the started attempt. `outputs`: the earlier steps' outputs, by step name;
    `step_digest`: the input's digest in the steps' idempotency keys."""

    input: dict[str, Any]
    outputs: dict[str, Any]
    step_digest: str


@dataclass(frozen=True, slots=True)
class CancelAtBoundary:
    """A cancel was requested: stop here, between two steps."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Fail the workflow (or its compensation) instead of running anything.

    `reason` is the failure's type in snake case, the label of the rejection metric.
    """

    failure: StepFailed

    @property
    def reason(self) -> str:
        name = str(self.failure.error["type"])
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


Decision = Run | CancelAtBoundary | Refuse


def decide(claimed: ClaimedWorkflow, definition: Workflow) -> Decision:
    """What to do with a just-claimed workflow. Never raises for anything a row holds."""
    if claimed.state == "running" and claimed.cancel_requested:
        return CancelAtBoundary()
    shape = _shape_refusal(claimed, definition)
    if shape is not None:
        return Refuse(shape)
    try:
        input, outputs, digest = _read(claimed, definition)
    except Exception as error:  # anything Python cannot decode or key: this row alone fails
        message = f"the stored input or context cannot be read: {type(error).__name__}: {_brief(error)}"
        return Refuse(failure("", 0, "UnreadableInput", message, retryable=False))
    if claimed.first_claim:
        # Its step rows, step 0 started, are created in the claiming transaction.
        invalid = _input_refusal(input, definition)
        return Run(input, outputs, digest) if invalid is None else Refuse(invalid)
    if not claimed.step_started:
        return Refuse(_not_started(claimed, definition))
    return Run(input, outputs, digest)


def _shape_refusal(claimed: ClaimedWorkflow, definition: Workflow) -> StepFailed | None:
    index = claimed.current_step_index
    if index >= len(definition.steps):
        steps = len(definition.steps)
        message = f"the definition of {definition.type!r} has {steps} steps; the workflow is at {index}"
        return failure("", 0, "DefinitionMismatch", message, retryable=False)
    if claimed.first_claim and (index != 0 or claimed.compensating):
        message = (
            f"a workflow with no step rows yet must be pending or running at step 0; this one is "
            f"{claimed.previous_state} at step {index}"
        )
        return failure("", 0, "InvalidRow", message, retryable=False)
    return None


def _read(claimed: ClaimedWorkflow, definition: Workflow) -> tuple[dict[str, Any], dict[str, Any], str]:
    input = definition.read_json(claimed.input_text)
    outputs = definition.read_json(claimed.context_text)
    if not isinstance(input, dict) or not isinstance(outputs, dict):
        raise TypeError("input and context must be JSON objects")
    return input, outputs, step_input_digest(claimed.idempotency_key, input)


def _brief(error: BaseException, limit: int = 300) -> str:
    # Errors about huge values quote them; the first few hundred characters say enough.
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."


def _input_refusal(input: dict[str, Any], definition: Workflow) -> StepFailed | None:
    try:
        definition.validate_input(input)
    except InputValidationError as error:
        refused = failure("", 0, "InputValidationError", str(error), retryable=False)
        return StepFailed({**refused.error, "messages": error.messages}, "", retryable=False)
    except Exception as error:  # a broken validator fails its workflow, not the daemon
        message = f"the input model of {definition.type!r} raised {type(error).__name__}: {_brief(error)}"
        return failure("", 0, "InputValidationError", message, retryable=False)
    return None


def _not_started(claimed: ClaimedWorkflow, definition: Workflow) -> StepFailed:
    """Why the claim started no attempt of the current step."""
    step = definition.steps[claimed.current_step_index]
    attempt = claimed.attempt or 0
    interrupted = "compensating" if claimed.compensating else "running"
    if claimed.previous_step_state != interrupted:
        message = f"step {step.name!r} is {claimed.previous_step_state} and cannot run now"
        return failure(step.name, attempt, "StateMismatch", message, retryable=False)
    if not claimed.compensating and not claimed.step_is_idempotent:
        message = (
            f"outcome unknown: the worker running step {step.name!r} (attempt {attempt}) stopped before "
            "recording its result, and the step is not idempotent, so it is not run again"
        )
        return failure(step.name, attempt, OUTCOME_UNKNOWN, message, retryable=False)
    what = f"the compensation of step {step.name!r}" if claimed.compensating else f"step {step.name!r}"
    message = (
        f"the worker died during {what} in attempt {attempt}, and no retries are left "
        f"({claimed.retry_count or 0} spent, interrupted attempts included): it is not run again"
    )
    return failure(step.name, attempt, "WorkerDied", message, retryable=False)
