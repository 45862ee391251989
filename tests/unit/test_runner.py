"""run_step: one attempt of a step and the meaning of its outcome, without a database."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest

from engine import NotExecuted, PermanentError, Snooze, Step, Workflow, WorkflowContext
from engine.errors import SNOOZE_SECONDS_MAX
from engine.runner import (
    StepFailed,
    StepSnoozed,
    StepSucceeded,
    run_compensation,
    run_step,
    with_workflow_output,
)


def context(attempt: int = 1) -> WorkflowContext:
    return WorkflowContext(
        workflow_id=uuid.uuid4(),
        workflow_type="t",
        step_name="s",
        step_index=0,
        idempotency_key="step:s:x",
        attempt=attempt,
    )


async def test_an_async_step_runs_on_the_loop_and_returns_its_output() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> dict[str, Any]:
        return {"doubled": input["n"] * 2, "key": ctx.idempotency_key}

    outcome = await run_step(Step("s", execute), {"n": 21}, context())
    assert outcome == StepSucceeded({"doubled": 42, "key": "step:s:x"}, '{"doubled":42,"key":"step:s:x"}')


async def test_a_plain_step_runs_in_the_executor_thread() -> None:
    def execute(input: Any, ctx: WorkflowContext) -> str:
        return threading.current_thread().name

    with ThreadPoolExecutor(thread_name_prefix="step") as executor:
        outcome = await run_step(Step("s", execute), {}, context(), executor)
    assert isinstance(outcome, StepSucceeded)
    assert outcome.output.startswith("step")


async def test_a_plain_function_may_return_an_awaitable() -> None:
    async def later() -> int:
        return 7

    outcome = await run_step(Step("s", lambda input, ctx: later()), {}, context())
    assert outcome == StepSucceeded(7, "7")


async def test_an_exception_is_a_retryable_failure_with_a_summary_and_a_traceback() -> None:
    def execute(input: Any, ctx: WorkflowContext) -> None:
        raise ConnectionError("exchange unreachable")

    outcome = await run_step(Step("s", execute), {}, context(attempt=3))
    assert isinstance(outcome, StepFailed)
    assert outcome.retryable
    assert outcome.error == {
        "type": "ConnectionError",
        "message": "exchange unreachable",
        "step": "s",
        "attempt": 3,
    }
    assert "Traceback" in outcome.traceback
    assert "exchange unreachable" in outcome.traceback


async def test_a_permanent_error_is_not_retryable() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> None:
        raise PermanentError("insufficient funds")

    outcome = await run_step(Step("s", execute), {}, context())
    assert isinstance(outcome, StepFailed)
    assert not outcome.retryable
    assert outcome.error["type"] == "PermanentError"


async def test_exceeding_the_timeout_is_a_retryable_step_timeout() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> None:
        await asyncio.sleep(5)

    outcome = await run_step(Step("s", execute, timeout=0.05), {}, context())
    assert isinstance(outcome, StepFailed)
    assert outcome.retryable
    assert outcome.error["type"] == "StepTimeout"
    assert outcome.error["message"] == "step 's' exceeded its timeout of 0.05 s"


async def test_a_timeout_error_raised_by_the_step_itself_is_not_our_timeout() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> None:
        raise TimeoutError

    outcome = await run_step(Step("s", execute, timeout=10), {}, context())
    assert isinstance(outcome, StepFailed)
    assert outcome.error["type"] == "TimeoutError"


async def test_system_exit_from_step_code_fails_the_step_not_the_process() -> None:
    def execute(input: Any, ctx: WorkflowContext) -> None:
        sys.exit(3)

    with ThreadPoolExecutor() as executor:
        outcome = await run_step(Step("s", execute), {}, context(), executor)
    assert isinstance(outcome, StepFailed)
    assert not outcome.retryable
    assert outcome.error["type"] == "SystemExit"


async def test_an_output_that_is_not_json_fails_permanently() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> Any:
        return {"when": object()}

    outcome = await run_step(Step("s", execute), {}, context())
    assert isinstance(outcome, StepFailed)
    assert not outcome.retryable
    assert outcome.error["type"] == "InvalidStepOutput"
    assert "not JSON-serialisable" in outcome.error["message"]


async def test_cancellation_propagates() -> None:
    started = asyncio.Event()

    async def execute(input: Any, ctx: WorkflowContext) -> None:
        started.set()
        await asyncio.sleep(5)

    task = asyncio.create_task(run_step(Step("s", execute), {}, context()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "broken", [ImportError("no module named 'web3'"), NameError("name 'x' is not defined")]
)
async def test_broken_code_is_not_retried(broken: Exception) -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> None:
        raise broken

    outcome = await run_step(Step("s", execute), {}, context())
    assert isinstance(outcome, StepFailed)
    assert not outcome.retryable
    assert outcome.error["type"] == type(broken).__name__


async def test_a_step_that_is_not_idempotent_is_retried_only_after_not_executed() -> None:
    async def refused(input: Any, ctx: WorkflowContext) -> None:
        raise NotExecuted("refused before acting")

    async def dropped(input: Any, ctx: WorkflowContext) -> None:
        raise ConnectionResetError("the connection dropped mid-call")

    not_executed = await run_step(Step("s", refused, is_idempotent=False), {}, context())
    unknown = await run_step(Step("s", dropped, is_idempotent=False), {}, context())
    assert isinstance(not_executed, StepFailed)
    assert not_executed.retryable
    assert isinstance(unknown, StepFailed)
    assert not unknown.retryable
    assert unknown.error["type"] == "OutcomeUnknown"
    assert "ConnectionResetError: the connection dropped mid-call" in unknown.error["message"]


async def test_a_timeout_of_a_step_that_is_not_idempotent_is_outcome_unknown() -> None:
    async def slow(input: Any, ctx: WorkflowContext) -> None:
        await asyncio.sleep(5)

    outcome = await run_step(Step("s", slow, is_idempotent=False, timeout=0.05), {}, context())
    assert isinstance(outcome, StepFailed)
    assert (outcome.error["type"], outcome.retryable) == ("OutcomeUnknown", False)
    assert outcome.still_running is None  # a coroutine stops at its timeout


async def test_a_timed_out_thread_is_reported_still_running_until_it_returns() -> None:
    release = threading.Event()

    def blocked(input: Any, ctx: WorkflowContext) -> None:
        release.wait(5)

    with ThreadPoolExecutor(max_workers=1) as executor:
        outcome = await run_step(Step("s", blocked, timeout=0.05), {}, context(), executor)
        assert isinstance(outcome, StepFailed)
        assert outcome.error["type"] == "StepTimeout"
        assert outcome.still_running is not None
        assert not outcome.still_running.done()
        release.set()
        await asyncio.wrap_future(outcome.still_running)


async def test_the_default_timeout_bounds_a_step_without_its_own() -> None:
    async def slow(input: Any, ctx: WorkflowContext) -> None:
        await asyncio.sleep(5)

    outcome = await run_step(Step("s", slow), {}, context(), default_timeout=0.05)
    assert isinstance(outcome, StepFailed)
    assert outcome.error["type"] == "StepTimeout"


async def test_an_output_with_a_decimal_or_a_mapping_is_stored_as_json() -> None:
    async def priced(input: Any, ctx: WorkflowContext) -> dict[str, Any]:
        return {"amount": Decimal("1.10"), "meta": MappingProxyType({"currency": "EUR"})}

    outcome = await run_step(Step("s", priced), {}, context())
    assert outcome == StepSucceeded(
        {"amount": 1.1, "meta": {"currency": "EUR"}}, '{"amount":1.1,"meta":{"currency":"EUR"}}'
    )


@pytest.mark.parametrize("output", [{"text": "nul\x00"}, {"x": float("nan")}, {"s": "\ud800"}])
async def test_an_output_jsonb_cannot_hold_fails_permanently(output: Any) -> None:
    async def returns(input: Any, ctx: WorkflowContext) -> Any:
        return output

    outcome = await run_step(Step("s", returns), {}, context())
    assert isinstance(outcome, StepFailed)
    assert (outcome.error["type"], outcome.retryable) == ("InvalidStepOutput", False)


def shaped_workflow(output: Any) -> Workflow:
    return Workflow(
        type="shaped", steps=[Step("a", lambda i, c: None), Step("b", lambda i, c: None)], output=output
    )


def test_the_workflow_output_is_shaped_from_the_input_and_every_steps_output() -> None:
    workflow = shaped_workflow(lambda input, outputs: {"sum": input["n"] + outputs["a"] + outputs["b"]})
    last = StepSucceeded(2, "2")
    outcome = with_workflow_output(
        workflow, last, input={"n": 1}, outputs={"a": 3}, step=workflow.steps[1], attempt=1
    )
    assert outcome == StepSucceeded(2, "2", '{"sum":6}')


def test_without_a_shape_the_last_steps_output_is_the_workflows() -> None:
    workflow = Workflow(type="plain", steps=[Step("a", lambda i, c: None)])
    last = StepSucceeded({"x": 1}, '{"x":1}')
    assert (
        with_workflow_output(workflow, last, input={}, outputs={}, step=workflow.steps[0], attempt=1) is last
    )


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (lambda input, outputs: outputs["missing"], "KeyError"),
        (lambda input, outputs: {"n": float("nan")}, "not storable as JSON"),
    ],
)
def test_a_shape_that_fails_fails_the_workflow_for_good(output: Any, reason: str) -> None:
    workflow = shaped_workflow(output)
    outcome = with_workflow_output(
        workflow, StepSucceeded(None, "null"), input={}, outputs={}, step=workflow.steps[1], attempt=2
    )
    assert isinstance(outcome, StepFailed)
    assert not outcome.retryable
    assert outcome.error["type"] == "InvalidWorkflowOutput"
    assert reason in outcome.error["message"]
    assert (outcome.error["step"], outcome.error["attempt"]) == ("b", 2)


async def test_an_exact_definition_reads_the_output_back_with_decimals() -> None:
    async def execute(input: Any, ctx: WorkflowContext) -> dict[str, Any]:
        return {"amount": Decimal("0.300000000000000001")}

    exact = Workflow(type="exact", steps=[Step("s", execute)], exact_numbers=True)
    outcome = await run_step(exact.steps[0], {}, context(), read_json=exact.read_json)
    assert outcome == StepSucceeded(
        {"amount": Decimal("0.300000000000000001")}, '{"amount":0.300000000000000001}'
    )


async def test_a_snooze_raised_or_returned_is_a_snooze_even_for_a_step_that_must_not_run_twice() -> None:
    async def raises(input: Any, ctx: WorkflowContext) -> None:
        raise Snooze(2.5, "no confirmations yet")

    def returns(input: Any, ctx: WorkflowContext) -> Snooze:
        return Snooze(1)

    raised = await run_step(Step("s", raises, is_idempotent=False), {}, context())
    returned = await run_step(Step("s", returns), {}, context())
    assert raised == StepSnoozed(2.5, "no confirmations yet")
    assert returned == StepSnoozed(1.0, "not yet: check again in 1 s")


async def test_a_compensation_that_snoozes_is_retried_as_a_failure() -> None:
    async def undo(input: Any, output: Any, ctx: WorkflowContext) -> None:
        raise Snooze(5)

    outcome = await run_compensation(Step("s", recorded_noop, compensate=undo), {}, None, context())
    assert isinstance(outcome, StepFailed)
    assert (outcome.retryable, outcome.error["type"]) == (True, "Snooze")


async def recorded_noop(input: Any, ctx: WorkflowContext) -> None:
    return None


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), SNOOZE_SECONDS_MAX + 1])
def test_a_snooze_lasts_a_positive_bounded_time(seconds: float) -> None:
    with pytest.raises(ValueError, match="a snooze lasts more than 0 and at most"):
        Snooze(seconds)
