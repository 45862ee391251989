"""Running one attempt of a step: the step's code, its timeout, and what its outcome means.

No database here: the caller commits the outcome. Async step functions run on the event
loop; plain ones in the given thread pool, so a blocking call never stalls the daemon.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import Any

from engine.definitions import Step, Workflow, WorkflowContext
from engine.errors import OUTCOME_UNKNOWN, InputValidationError, NotExecuted, PermanentError, Snooze
from engine.idempotency import json_text

JsonReader = Callable[[str], Any]


@dataclass(frozen=True)
class StepSucceeded:
    """The attempt returned `output`, stored as `output_json` (the store's own text of
    it; `output` is that text read back, what later steps see after any restart).
    `workflow_output_json`: the workflow's final output when the definition shapes it
    (`Workflow.output`) and this was its last step; else the step's output is that."""

    output: Any
    output_json: str = "null"
    workflow_output_json: str | None = None


@dataclass(frozen=True)
class StepFailed:
    """The attempt failed. `error` is the summary stored on the rows and shown by the API
    ({type, message, step, attempt}); the traceback goes to the event log only.

    `still_running`: set when a plain function timed out and its thread has not
    returned; it resolves when the thread does (Python cannot stop a thread).
    """

    error: Mapping[str, Any]
    traceback: str
    retryable: bool
    still_running: Future[None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StepSnoozed:
    """The attempt said "not yet" (engine.Snooze): no effect, run it again in `seconds`."""

    seconds: float
    reason: str


StepOutcome = StepSucceeded | StepFailed | StepSnoozed


def failure(
    step: str, attempt: int, error_type: str, message: str, *, retryable: bool, trace: str = ""
) -> StepFailed:
    """A StepFailed built from its parts."""
    summary = {"type": error_type, "message": message, "step": step, "attempt": attempt}
    return StepFailed(error=summary, traceback=trace, retryable=retryable)


def succeeded(output: Any, read_json: JsonReader = json.loads) -> StepSucceeded:
    """The outcome of an attempt that returned `output`; raises TypeError or
    UnstorableValueError (a ValueError) when the output cannot be stored."""
    text = json_text(output)
    return StepSucceeded(read_json(text), text)


def with_workflow_output(
    workflow: Workflow,
    outcome: StepSucceeded,
    *,
    input: Any,
    outputs: Mapping[str, Any],
    step: Step,
    attempt: int,
) -> StepSucceeded | StepFailed:
    """The last step's outcome carrying the workflow's final output, as `workflow.output`
    shapes it from the input and every step's output; a shaping that raises or returns
    what JSON cannot hold fails the attempt for good (a deploy fixes it; `retry` resumes)."""
    if workflow.output is None:
        return outcome
    try:
        text = json_text(workflow.output(input, {**outputs, step.name: outcome.output}))
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        message = f"the output of workflow type {workflow.type!r} could not be made: {reason}"
        trace = "".join(traceback.format_exception(error))
        return failure(step.name, attempt, "InvalidWorkflowOutput", message, retryable=False, trace=trace)
    return replace(outcome, workflow_output_json=text)


# Failures that another attempt cannot fix: the step said so, the input is invalid, or
# the code itself is broken (a missing import, a misspelt name). A deploy fixes those,
# and the retry command resumes the workflow afterwards.
NOT_RETRYABLE = (PermanentError, InputValidationError, ImportError, NameError, SyntaxError)


def _failure_from(error: BaseException, step: Step, attempt: int, *, at_most_once: bool) -> StepFailed:
    # Step code that tries to end the process (SystemExit and the like, which are not
    # Exceptions) is broken code too.
    retryable = isinstance(error, Exception) and not isinstance(error, NOT_RETRYABLE)
    trace = "".join(traceback.format_exception(error))
    if at_most_once and retryable and not isinstance(error, NotExecuted):
        return outcome_unknown(step, attempt, f"{type(error).__name__}: {error}", trace)
    return failure(step.name, attempt, type(error).__name__, str(error), retryable=retryable, trace=trace)


def outcome_unknown(step: Step, attempt: int, ending: str, trace: str = "") -> StepFailed:
    """A step that must run at most once ended without saying whether it took effect."""
    message = (
        f"outcome unknown: step {step.name!r} is not idempotent and its attempt {attempt} ended with "
        f"{ending}; it may have taken effect, so it is not run again (step code raises "
        "engine.NotExecuted to say an attempt did not take effect)"
    )
    return failure(step.name, attempt, OUTCOME_UNKNOWN, message, retryable=False, trace=trace)


async def _call(
    fn: Callable[..., Any], args: tuple[Any, ...], executor: Executor | None, thread: Future[None]
) -> Any:
    """Call a step function; `thread` runs from when a plain function's thread starts it
    until it returns (it may outlive the attempt: Python cannot stop a thread)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)

    def in_thread() -> Any:
        thread.set_running_or_notify_cancel()
        try:
            return fn(*args)
        finally:
            thread.set_result(None)

    result = await asyncio.get_running_loop().run_in_executor(executor, in_thread)
    # A plain function may still hand back an awaitable (a lambda around a coroutine).
    return await result if inspect.isawaitable(result) else result


async def run_step(
    step: Step,
    input: Any,
    ctx: WorkflowContext,
    executor: Executor | None = None,
    *,
    default_timeout: float | None = None,
    read_json: JsonReader = json.loads,
) -> StepOutcome:
    """Run one attempt of `step` and classify its outcome; never raises for step errors.

    The step's `timeout`, else `default_timeout`, bounds the attempt. A timeout or any
    other error is retryable, except for a step that is not idempotent: then only
    `NotExecuted` is, and anything else is an "outcome unknown" failure. A plain
    function that times out keeps running in its thread (Python cannot stop a thread):
    its result is ignored and the failure's `still_running` says when it ends.
    Cancellation (shutdown) is not a step error and propagates; anything else the step
    raises, even SystemExit, becomes a failed attempt. `read_json` reads the stored
    output back as later steps will see it (Workflow.read_json).
    """
    assert step.execute is not None  # a step that waits for an event has none: the driver waits
    at_most_once = not step.is_idempotent
    timeout = step.timeout or default_timeout
    return await _attempt(
        step, step.execute, (input, ctx), ctx, executor,
        limit=timeout, at_most_once=at_most_once, read_json=read_json,
    )  # fmt: skip


async def run_compensation(
    step: Step,
    input: Any,
    output: Any,
    ctx: WorkflowContext,
    executor: Executor | None = None,
    *,
    default_timeout: float | None = None,
) -> StepOutcome:
    """Run one attempt of the step's compensate function, as `run_step` runs execute.

    A step without a compensate function has nothing to undo: it succeeds at once.
    Compensations are retried on any error: an undo must be safe to repeat.
    """
    if step.compensate is None:
        return StepSucceeded(None)
    timeout = step.timeout or default_timeout
    args = (input, output, ctx)
    return await _attempt(
        step, step.compensate, args, ctx, executor, limit=timeout, at_most_once=False, may_snooze=False
    )


async def _attempt(
    step: Step,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    ctx: WorkflowContext,
    executor: Executor | None,
    *,
    limit: float | None,
    at_most_once: bool,
    read_json: JsonReader = json.loads,
    may_snooze: bool = True,
) -> StepOutcome:
    deadline = asyncio.timeout(limit)
    thread: Future[None] = Future()
    try:
        async with deadline:
            output = await _call(fn, args, executor, thread)
    except asyncio.CancelledError:
        raise
    except Snooze as snooze:
        return _snoozed(snooze, step, ctx.attempt, may_snooze)
    except TimeoutError as error:
        if not deadline.expired():  # the step's own TimeoutError, not our deadline
            return _failure_from(error, step, ctx.attempt, at_most_once=at_most_once)
        return _timed_out(step, ctx.attempt, limit, thread, at_most_once)
    except BaseException as error:  # broken step code must not stop the daemon
        return _failure_from(error, step, ctx.attempt, at_most_once=at_most_once)
    return _returned(output, step, ctx.attempt, may_snooze, read_json)


def _returned(output: Any, step: Step, attempt: int, may_snooze: bool, read_json: JsonReader) -> StepOutcome:
    """The outcome of an attempt that returned `output`: a Snooze, or a result to store."""
    if isinstance(output, Snooze):
        return _snoozed(output, step, attempt, may_snooze)
    try:
        return succeeded(output, read_json)
    except (TypeError, ValueError, RecursionError) as error:
        message = f"step {step.name!r} returned a value that cannot be stored as JSON: {error}"
        return failure(step.name, attempt, "InvalidStepOutput", message, retryable=False)


def _snoozed(snooze: Snooze, step: Step, attempt: int, may_snooze: bool) -> StepOutcome:
    if may_snooze:
        return StepSnoozed(snooze.seconds, snooze.reason)
    # An undo waits by failing: compensations retry on any error, with backoff.
    message = f"a compensation cannot snooze ({snooze.reason}): it is retried with backoff instead"
    return failure(step.name, attempt, "Snooze", message, retryable=True)


def _timed_out(
    step: Step, attempt: int, timeout: float | None, thread: Future[None], at_most_once: bool
) -> StepFailed:
    ending = f"a timeout after {timeout:g} s"
    if at_most_once:
        outcome = outcome_unknown(step, attempt, ending)
    else:
        message = f"step {step.name!r} exceeded its timeout of {timeout:g} s"
        outcome = failure(step.name, attempt, "StepTimeout", message, retryable=True)
    # A thread the timeout found queued was cancelled before it ran; a started one runs on.
    return replace(outcome, still_running=thread if thread.running() else None)
