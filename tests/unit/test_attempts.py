"""decide: what a claimed workflow is to do, one test per outcome, without a database."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
from pydantic import BaseModel

from engine import Step, Workflow
from engine.attempts import CancelAtBoundary, ClaimedWorkflow, Refuse, Run, decide
from engine.idempotency import step_input_digest


async def _noop(input: Any, ctx: Any) -> None:
    return None


class Order(BaseModel):
    amount: float


def broken_validator(value: Any) -> Any:
    raise ZeroDivisionError("the validator itself is broken")


ORDER = Workflow(
    type="order",
    input_model=Order,
    steps=[Step("charge", _noop, is_idempotent=False), Step("ship", _noop)],
)


def claimed(**changes: Any) -> ClaimedWorkflow:
    """A workflow at its first claim; `changes` make it anything else."""
    row = ClaimedWorkflow(
        id=uuid.uuid4(),
        type="order",
        version=None,
        state="running",
        previous_state="pending",
        input_text=json.dumps({"amount": 5}),
        context_text="{}",
        user_id="u1",
        wallet_address=None,
        idempotency_key="workflow:order:u1:abc",
        current_step_index=0,
        lease_token=uuid.uuid4(),
        cancel_requested=False,
        pickup_lag_seconds=0.01,
        previous_step_state=None,
        step_is_idempotent=None,
        attempt=None,
        retry_count=None,
        step_started=False,
    )
    return replace(row, **changes)


def resumed(**changes: Any) -> ClaimedWorkflow:
    """A workflow claimed again at step 1, whose attempt the claim started."""
    return claimed(
        previous_state="running", current_step_index=1, previous_step_state="failed",
        step_is_idempotent=True, attempt=2, retry_count=1, step_started=True,
        context_text=json.dumps({"charge": {"paid": True}}),
    ) if not changes else replace(resumed(), **changes)  # fmt: skip


def refusal(decision: Any) -> dict[str, Any]:
    assert isinstance(decision, Refuse), decision
    return dict(decision.failure.error)


def test_a_first_claim_runs_step_0_with_its_input_and_digest() -> None:
    decision = decide(claimed(), ORDER)
    assert decision == Run({"amount": 5}, {}, step_input_digest("workflow:order:u1:abc", {"amount": 5}))


def test_a_resumed_workflow_runs_with_the_outputs_of_the_earlier_steps() -> None:
    decision = decide(resumed(), ORDER)
    assert isinstance(decision, Run)
    assert decision.outputs == {"charge": {"paid": True}}


def test_a_cancel_request_stops_a_running_workflow_at_the_step_boundary() -> None:
    assert decide(resumed(cancel_requested=True, step_started=False), ORDER) == CancelAtBoundary()


def test_a_workflow_past_the_definitions_last_step_is_a_definition_mismatch() -> None:
    assert refusal(decide(resumed(current_step_index=2), ORDER))["type"] == "DefinitionMismatch"


@pytest.mark.parametrize("changes", [{"current_step_index": 1}, {"state": "compensating"}])
def test_a_first_claim_anywhere_but_at_step_0_running_is_an_invalid_row(changes: dict[str, Any]) -> None:
    assert refusal(decide(claimed(**changes), ORDER))["type"] == "InvalidRow"


@pytest.mark.parametrize(
    "input_text",
    [
        '{"amount": 1' + "0" * 5000 + "}",  # beyond Python's int parsing
        '{"amount": 1' + "0" * 400 + ".5}",  # a float overflow: no canonical form
        '{"deep": ' + "[" * 5000 + "]" * 5000 + "}",  # beyond Python's recursion limit
        "[1, 2]",  # not an object
    ],
)
def test_an_input_python_cannot_read_is_refused_as_unreadable(input_text: str) -> None:
    error = refusal(decide(claimed(input_text=input_text), ORDER))
    assert error["type"] == "UnreadableInput"
    assert len(error["message"]) < 500  # the huge value is not quoted whole


def test_a_context_that_is_not_an_object_is_refused_as_unreadable() -> None:
    assert refusal(decide(resumed(context_text="[]"), ORDER))["type"] == "UnreadableInput"


def test_an_input_the_model_rejects_is_refused_at_the_first_claim_only() -> None:
    error = refusal(decide(claimed(input_text='{"amount": "lots"}'), ORDER))
    assert error["type"] == "InputValidationError"
    assert error["messages"] == ["amount: Input should be a valid number, unable to parse string as a number"]
    assert isinstance(decide(resumed(input_text='{"amount": "lots"}'), ORDER), Run)


def test_a_validator_that_raises_fails_its_workflow_not_the_daemon() -> None:
    workflow = replace(ORDER, input_model=None)
    object.__setattr__(workflow, "validate_input", broken_validator)
    error = refusal(decide(claimed(), workflow))
    assert error["type"] == "InputValidationError"
    assert "ZeroDivisionError" in error["message"]


def test_an_interrupted_step_that_is_not_idempotent_is_outcome_unknown() -> None:
    row = resumed(
        current_step_index=0, previous_step_state="running", step_is_idempotent=False, step_started=False
    )
    error = refusal(decide(row, ORDER))
    assert error["type"] == "OutcomeUnknown"
    assert error["step"] == "charge"


def test_an_interrupted_step_with_no_retries_left_is_a_worker_that_died() -> None:
    row = resumed(previous_step_state="running", attempt=3, retry_count=3, step_started=False)
    error = refusal(decide(row, ORDER))
    assert error["type"] == "WorkerDied"
    assert "'ship'" in error["message"]


def test_an_interrupted_compensation_with_no_retries_left_is_a_worker_that_died() -> None:
    row = resumed(state="compensating", previous_step_state="compensating", step_started=False)
    error = refusal(decide(row, ORDER))
    assert error["type"] == "WorkerDied"
    assert "compensation" in error["message"]


def test_a_step_in_a_state_no_attempt_starts_from_is_a_state_mismatch() -> None:
    assert (
        refusal(decide(resumed(previous_step_state="completed", step_started=False), ORDER))["type"]
        == "StateMismatch"
    )


def test_the_rejection_metric_names_the_reason_in_snake_case() -> None:
    decision = decide(resumed(current_step_index=2), ORDER)
    assert isinstance(decision, Refuse)
    assert decision.reason == "definition_mismatch"
