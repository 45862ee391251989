"""Running one attempt of a step: the step's code, its timeout, and what its outcome means.

No database here: the caller commits the outcome. Async step functions run on the event
loop; plain ones in the given thread pool, so a blocking call never stalls the daemon.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from engine.definitions import Step, WorkflowContext
from engine.errors import InputValidationError, PermanentError
from engine.idempotency import canonical_json


@dataclass(frozen=True)
class StepSucceeded:
    """The attempt returned this JSON-serialisable output."""

    output: Any


@dataclass(frozen=True)
class StepFailed:
    """The attempt failed. `error` is the summary stored on the rows and shown by the API
    ({type, message, step, attempt}); the traceback goes to the event log only."""

    error: Mapping[str, Any]
    traceback: str
    retryable: bool


StepOutcome = StepSucceeded | StepFailed


def failure(
    step: str, attempt: int, error_type: str, message: str, *, retryable: bool, trace: str = ""
) -> StepFailed:
    """A StepFailed built from its parts."""
    summary = {"type": error_type, "message": message, "step": step, "attempt": attempt}
    return StepFailed(error=summary, traceback=trace, retryable=retryable)


# Failures that another attempt cannot fix: the step said so, the input is invalid, or
# the code itself is broken (a missing import, a misspelt name). A deploy fixes those,
# and the retry command resumes the workflow afterwards.
NOT_RETRYABLE = (PermanentError, InputValidationError, ImportError, NameError, SyntaxError)


def _failure_from(error: BaseException, step: Step, attempt: int) -> StepFailed:
    # Step code that tries to end the process (SystemExit and the like, which are not
    # Exceptions) is broken code too.
    retryable = isinstance(error, Exception) and not isinstance(error, NOT_RETRYABLE)
    trace = "".join(traceback.format_exception(error))
    return failure(step.name, attempt, type(error).__name__, str(error), retryable=retryable, trace=trace)


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], executor: Executor | None) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(executor, functools.partial(fn, *args))
    # A plain function may still hand back an awaitable (a lambda around a coroutine).
    return await result if inspect.isawaitable(result) else result


async def run_step(
    step: Step, input: Any, ctx: WorkflowContext, executor: Executor | None = None
) -> StepOutcome:
    """Run one attempt of `step` and classify its outcome; never raises for step errors.

    A timeout fails the attempt as retryable. A plain function that times out keeps
    running in its thread (Python cannot stop a thread), but its result is ignored.
    Cancellation (shutdown) is not a step error and propagates; anything else the step
    raises, even SystemExit, becomes a failed attempt.
    """
    return await _attempt(step, step.execute, (input, ctx), ctx, executor)


async def run_compensation(
    step: Step, input: Any, output: Any, ctx: WorkflowContext, executor: Executor | None = None
) -> StepOutcome:
    """Run one attempt of the step's compensate function, as `run_step` runs execute.

    A step without a compensate function has nothing to undo: it succeeds at once.
    """
    if step.compensate is None:
        return StepSucceeded(None)
    return await _attempt(step, step.compensate, (input, output, ctx), ctx, executor)


async def _attempt(
    step: Step, fn: Callable[..., Any], args: tuple[Any, ...], ctx: WorkflowContext, executor: Executor | None
) -> StepOutcome:
    deadline = asyncio.timeout(step.timeout)
    try:
        async with deadline:
            output = await _call(fn, args, executor)
    except asyncio.CancelledError:
        raise
    except TimeoutError as error:
        if not deadline.expired():  # the step's own TimeoutError, not our deadline
            return _failure_from(error, step, ctx.attempt)
        message = f"step {step.name!r} exceeded its timeout of {step.timeout:g} s"
        return failure(step.name, ctx.attempt, "StepTimeout", message, retryable=True)
    except BaseException as error:  # broken step code must not stop the daemon
        return _failure_from(error, step, ctx.attempt)
    try:
        canonical_json(output)
    except (TypeError, ValueError) as error:
        message = f"step {step.name!r} returned a value that is not JSON-serialisable: {error}"
        return failure(step.name, ctx.attempt, "InvalidStepOutput", message, retryable=False)
    return StepSucceeded(output)
