"""Driving one claimed workflow: run its current step (or compensation), commit the
outcome fenced by the lease, and go straight on to the next step while the lease holds.

Every result write is fenced by the lease token; a write that meets a database outage
is retried while the lease lasts, and one whose answer a dropped connection lost is
settled by reading the workflow back. A transactional step runs inside the transaction
that records its completion. Whatever goes wrong in here ends with this workflow alone:
its lease is given back, and the claim's rules decide what happens next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.group_commit import GroupCommit
from daemon.metrics import Metrics
from daemon.tracing import ContextCopyingExecutor, Tracing
from engine.attempts import ClaimedWorkflow
from engine.definitions import Step, Workflow, WorkflowContext
from engine.errors import SNOOZE_SECONDS_MAX
from engine.idempotency import compensation_key, step_key
from engine.primary import READ_ONLY_ERRORS
from engine.retry import RetryPolicy
from engine.runner import (
    StepFailed,
    StepOutcome,
    StepSnoozed,
    StepSucceeded,
    failure,
    outcome_unknown,
    run_compensation,
    run_step,
    with_workflow_output,
)
from engine.store import Advanced, Completion, FailedAttempt, Store

T = TypeVar("T")

# Errors that mean "the database is not answering right now" (out of reach, or what
# answered was not the primary), to ride out with backoff: never a step's failure.
DATABASE_ERRORS = (psycopg.OperationalError, PoolTimeout, *READ_ONLY_ERRORS)
DB_RETRY_DELAY_MAX_SECONDS = 2.0


@dataclass
class Assignment:
    """A claimed workflow this worker is driving, and the lease it holds on it.

    `attempt` and `retry_count` count the current step's attempts, or its compensation's
    when `compensating`.
    """

    claimed: ClaimedWorkflow
    definition: Workflow
    input: dict[str, Any]
    step_index: int
    attempt: int
    retry_count: int
    # Monotonic time after which another worker may own the workflow.
    lease_deadline: float
    outputs: dict[str, Any]
    # The digest of the workflow's input in its steps' idempotency keys.
    step_digest: str
    cancel_requested: bool = False
    # What this run came to, once it knows (the run span's outcome): `completed`,
    # `retry_scheduled`, `lease_lost` ...; None: not yet (or cut short by a shutdown).
    ended: str | None = None

    @property
    def workflow_id(self) -> UUID:
        return self.claimed.id

    @property
    def lease_token(self) -> UUID:
        return self.claimed.lease_token

    @property
    def compensating(self) -> bool:
        return self.claimed.compensating

    @property
    def step(self) -> Step:
        return self.definition.steps[self.step_index]


class LeaseLostError(Exception):
    """The lease ran out, or was taken over, before the result could be committed."""


class _AttemptFailed(Exception):
    """Leaves a transactional step's transaction, or the waiting transaction of a step
    that waits for an event, rolling its writes back (a failed or a snoozed attempt)."""

    def __init__(self, outcome: StepFailed | StepSnoozed) -> None:
        super().__init__(outcome.error.get("message") if isinstance(outcome, StepFailed) else outcome.reason)
        self.outcome = outcome


@dataclass(frozen=True)
class DriverConfig:
    worker_id: str
    concurrency: int
    lease_seconds: float
    retry_policy: RetryPolicy
    # Bounds every attempt of a step that sets no timeout of its own.
    step_timeout: float | None


class Driver:
    """Runs claimed workflows for one worker; shared by all its workflow tasks."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        config: DriverConfig,
        *,
        metrics: Metrics,
        stopping: asyncio.Event,
        log: Any,
        tracing: Tracing | None = None,
    ) -> None:
        self.pool = pool
        self.store = Store(pool)
        self.config = config
        self.id = config.worker_id
        self.metrics = metrics
        # Once set, completed steps do not go on to the next one (shutdown).
        self.stopping = stopping
        self.log = log
        self.group_commit = GroupCommit(self.store, worker_id=self.id)
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="step")
        # None: no tracing, and no tracing work at all on the hot path.
        self.tracing = tracing
        # Traced, a plain step function runs in a copy of its attempt's context.
        self.step_executor: Executor = (
            self.executor if tracing is None else ContextCopyingExecutor(self.executor)
        )
        # Workflows a timed-out attempt of which still runs in a thread here: not to be
        # claimed by this process until it returns.
        self.busy: set[UUID] = set()
        self.lost_leases = 0
        # Types whose every step start must pass a claim (a rate limit's token each).
        self.claim_every_step: frozenset[str] = frozenset()

    def close(self) -> None:
        """Stop the step threads' pool (a thread still running is left to finish) and
        say how many leases this process lost."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.log.info("driver_closed", lost_leases=self.lost_leases)

    async def drive(self, assignment: Assignment) -> None:
        """Run the workflow's steps one after the other while this worker holds its lease."""
        if self.tracing is None:
            await self._drive(assignment, traced=False)
            return
        with self.tracing.run(assignment.claimed, worker_id=self.id) as span:
            try:
                # A run the sampler left out would have its attempts left out too: they
                # get no span at all (the run's context, current, still propagates).
                await self._drive(assignment, traced=span.is_recording())
            finally:
                self.tracing.run_ended(span, assignment.ended or "interrupted")

    async def _drive(self, assignment: Assignment, *, traced: bool) -> None:
        try:
            go_on = True
            while go_on:
                go_on = await (self._traced_step(assignment) if traced else self._step(assignment))
        except LeaseLostError:
            assignment.ended = "lease_lost"
            self.lost_leases += 1
            self.metrics.lost_leases.inc()
            self._log(assignment).warning("lease_lost")
        except Exception:
            # A bug here must cost this workflow a retry, not its lease for the lease's
            # length nor the daemon: give the lease back; the claim counts the attempt.
            assignment.ended = "crashed"
            self._log(assignment).exception("workflow_task_crashed")
            await self._release(assignment)

    async def _step(self, assignment: Assignment) -> bool:
        """One attempt of the current step and the commit of its outcome; returns
        whether to go straight on to the next step."""
        if assignment.step.wait_for_event is not None and not assignment.compensating:
            return await self._wait_for_event(assignment)
        if assignment.step.transactional:
            return await self._run_transactional(assignment)
        outcome = await self._run(assignment)
        # The write is shielded: a shutdown cancels further steps, not a result.
        write = asyncio.ensure_future(self._record(assignment, outcome))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            raise

    async def _traced_step(self, assignment: Assignment) -> bool:
        """_step inside the attempt's span."""
        assert self.tracing is not None
        with self.tracing.attempt(
            workflow_id=assignment.workflow_id, type=assignment.definition.type, step=assignment.step.name,
            attempt=assignment.attempt, compensating=assignment.compensating,
        ):  # fmt: skip
            return await self._step(assignment)

    async def _release(self, assignment: Assignment) -> None:
        leases = {assignment.workflow_id: assignment.lease_token}
        try:
            await self.store.release_leases(worker_id=self.id, leases=leases)
        except DATABASE_ERRORS as error:
            self._log(assignment).warning("lease_not_released", error=str(error).strip())

    def _log(self, assignment: Assignment) -> Any:
        # Bound only when there is something to say: binding costs, and steps are many.
        return self.log.bind(
            workflow_id=str(assignment.workflow_id), type=assignment.definition.type,
            step=assignment.step.name, attempt=assignment.attempt,
        )  # fmt: skip

    async def _run(self, assignment: Assignment, ctx: WorkflowContext | None = None) -> StepOutcome:
        """One attempt of the current step, or of its compensation."""
        ctx = ctx or self._context(assignment)
        started = time.monotonic()
        timeout = self.config.step_timeout
        if assignment.compensating:
            output = assignment.outputs.get(assignment.step.name)
            outcome = await run_compensation(
                assignment.step, assignment.input, output, ctx, self.step_executor, default_timeout=timeout
            )
        else:
            definition = assignment.definition
            outcome = await run_step(
                assignment.step, assignment.input, ctx, self.step_executor,
                default_timeout=timeout, read_json=definition.read_json,
            )  # fmt: skip
            if isinstance(outcome, StepSucceeded) and assignment.step_index == len(definition.steps) - 1:
                outcome = with_workflow_output(
                    definition, outcome, input=assignment.input, outputs=assignment.outputs,
                    step=assignment.step, attempt=assignment.attempt,
                )  # fmt: skip
        self._count_attempt(assignment, outcome, time.monotonic() - started)
        if isinstance(outcome, StepFailed) and outcome.still_running is not None:
            self._hold_until_done(assignment, outcome.still_running)
        return outcome

    def _hold_until_done(self, assignment: Assignment, thread: Future[None]) -> None:
        """Keep this process from claiming the workflow while a timed-out thread runs on."""
        workflow_id = assignment.workflow_id
        self.busy.add(workflow_id)
        self._log(assignment).warning("step_thread_still_running")
        asyncio.wrap_future(thread).add_done_callback(lambda _: self.busy.discard(workflow_id))

    def _count_attempt(self, assignment: Assignment, outcome: StepOutcome, seconds: float) -> None:
        succeeded = isinstance(outcome, StepSucceeded)
        if assignment.compensating:
            result = "compensated" if succeeded else "compensation_failed"
        elif isinstance(outcome, StepSnoozed):
            result = "snoozed"
        else:
            result = "succeeded" if succeeded else "failed"
        labels = (assignment.definition.type, assignment.step.name, result)
        self.metrics.step_duration.labels(*labels).observe(seconds)
        self.metrics.step_attempts.labels(*labels).inc()
        self._trace_attempt(result, outcome)

    def _trace_attempt(self, result: str, outcome: StepOutcome | None = None) -> None:
        """The outcome of the attempt on its span, when tracing."""
        if self.tracing is not None:
            self.tracing.attempt_ended(result, outcome)

    def _context(self, assignment: Assignment) -> WorkflowContext:
        claimed = assignment.claimed
        step = assignment.step
        key = compensation_key if assignment.compensating else step_key
        return WorkflowContext(
            workflow_id=assignment.workflow_id,
            workflow_type=assignment.definition.type,
            step_name=step.name,
            step_index=assignment.step_index,
            idempotency_key=key(step.name, assignment.step_digest),
            attempt=assignment.attempt,
            outputs=dict(assignment.outputs),
            config=step.config,
            user_id=claimed.user_id,
            wallet_address=claimed.wallet_address,
            cancel_check=lambda: assignment.cancel_requested,
        )

    # Recording an outcome.

    async def _record(self, assignment: Assignment, outcome: StepOutcome) -> bool:
        """Commit an attempt's outcome; returns whether to go straight on to the next step."""
        if not isinstance(outcome, StepSucceeded):
            await self._record_not_done(assignment, outcome)
            return False
        write = self._completion(assignment, outcome, transaction=None)
        return self._advance(assignment, outcome, await self._fenced(assignment, write, self._settle))

    async def _record_not_done(self, assignment: Assignment, outcome: StepFailed | StepSnoozed) -> None:
        if isinstance(outcome, StepFailed):
            await self._record_failure(assignment, outcome)
            return
        snooze = partial(
            self.store.snooze_step, workflow_id=assignment.workflow_id, lease_token=assignment.lease_token,
            step_index=assignment.step_index, attempt=assignment.attempt, worker_id=self.id,
            seconds=outcome.seconds, reason=outcome.reason,
        )  # fmt: skip
        await self._fenced(assignment, snooze)
        assignment.ended = "snoozed"
        self._log(assignment).info("step_snoozed", reason=outcome.reason, seconds=outcome.seconds)

    async def _record_failure(self, assignment: Assignment, outcome: StepFailed) -> None:
        step = assignment.step
        retries = step.retries(assignment.definition.max_retries)
        failed = FailedAttempt(
            assignment.workflow_id, assignment.lease_token, assignment.step_index, assignment.attempt,
            outcome.error, outcome.traceback, self.id, compensation=assignment.compensating,
        )  # fmt: skip
        if outcome.retryable and assignment.retry_count < retries:
            delay = self.config.retry_policy.delay(assignment.retry_count)
            await self._fenced(assignment, lambda: self.store.schedule_retry(failed, delay_seconds=delay))
            assignment.ended = "retry_scheduled"
            self.metrics.retries.labels(assignment.definition.type, step.name).inc()
            self._log(assignment).warning(
                "step_retry_scheduled", error=outcome.error["message"], delay_seconds=round(delay, 3)
            )
            return
        if assignment.compensating:
            await self._fenced(assignment, lambda: self.store.fail_workflow(failed))
            assignment.ended = "compensation_failed"
            self._log(assignment).error("compensation_failed", error=outcome.error["message"])
        else:
            await self._fenced(assignment, lambda: self._fail_forward(failed, assignment))
            assignment.ended = "failed"
            self._log(assignment).error("workflow_failed", error=outcome.error["message"])
        if assignment.compensating or not assignment.definition.requires_compensation:
            self.metrics.workflows_finished.labels(assignment.definition.type, "failed").inc()

    async def _fail_forward(self, failed: FailedAttempt, assignment: Assignment) -> bool:
        # A workflow that requires compensation starts undoing its steps in the same
        # transaction that fails it.
        async with self.store.transaction() as tx:
            recorded = await tx.fail_workflow(failed)
            if recorded and assignment.definition.requires_compensation:
                await tx.begin_compensation(workflow_id=assignment.workflow_id, worker_id=self.id)
            return recorded

    def _may_go_on(self, assignment: Assignment) -> bool:
        # Not while stopping; and not with a lease whose renewal is overdue: the next
        # step would run while another worker may already be claiming the workflow.
        # (complete_steps refuses going on under an expired lease in any case.)
        # Nor for a type whose every step start is counted by a claim (a rate limit).
        if self.stopping.is_set() or assignment.definition.type in self.claim_every_step:
            return False
        if assignment.lease_deadline - time.monotonic() < self.config.lease_seconds / 3:
            self._log(assignment).warning("lease_renewal_overdue", action="releasing the workflow")
            return False
        return True

    def _completion(
        self, assignment: Assignment, outcome: StepSucceeded, *, transaction: Store | None
    ) -> Callable[[], Awaitable[Advanced | None]]:
        """The write that records a succeeded attempt: in a transactional step's own
        `transaction`, else in the group commit (a compensation on its own)."""
        go_on = self._may_go_on(assignment)
        store = transaction or self.store
        if assignment.compensating:
            return lambda: store.complete_compensation(
                workflow_id=assignment.workflow_id, lease_token=assignment.lease_token,
                step_index=assignment.step_index, attempt=assignment.attempt, go_on=go_on,
                worker_id=self.id,
            )  # fmt: skip
        completion = Completion(
            assignment.workflow_id, assignment.lease_token, assignment.step_index, assignment.attempt,
            outcome.output_json, go_on, outcome.workflow_output_json,
        )  # fmt: skip
        if transaction is None:
            return lambda: self.group_commit.complete(completion)
        return lambda: self._complete_alone(transaction, completion)

    async def _complete_alone(self, store: Store, completion: Completion) -> Advanced | None:
        rows = await store.complete_steps([completion], worker_id=self.id)
        return rows.get(completion.workflow_id)

    def _advance(self, assignment: Assignment, outcome: StepSucceeded, result: Advanced | None) -> bool:
        """Follow a recorded completion: a finished workflow, or the next step under the
        same lease (the heartbeat keeps renewing it). Returns whether to go on."""
        if result is None:
            raise LeaseLostError
        if not assignment.compensating:
            assignment.outputs[assignment.step.name] = outcome.output
        if result.was_last:
            final = "compensated" if assignment.compensating else "completed"
            self._log(assignment).info(f"workflow_{final}")
            self.metrics.workflows_finished.labels(assignment.definition.type, final).inc()
        return self._move_to(assignment, result)

    @staticmethod
    def _move_to(assignment: Assignment, result: Advanced) -> bool:
        if result.next_step_index is None or result.next_attempt is None:
            finished = "compensated" if assignment.compensating else "completed"
            assignment.ended = finished if result.was_last else "released"
            return False
        assignment.step_index = result.next_step_index
        assignment.attempt = result.next_attempt
        assignment.retry_count = result.next_retry_count or 0
        return True

    # Transactional steps.

    async def _run_transactional(self, assignment: Assignment) -> bool:
        """Run a transactional step (or its compensation) inside the transaction that
        records its completion.

        The step's own writes and its completion commit together or not at all: a lost
        lease or a crash rolls both back, so its database effects happen exactly once.
        """
        before = (assignment.step_index, assignment.attempt, assignment.retry_count, dict(assignment.outputs))
        try:
            async with self.pool.connection() as conn:
                outcome = await self._transactional_attempt(conn, assignment)
        except DATABASE_ERRORS as error:
            assignment.step_index, assignment.attempt, assignment.retry_count, assignment.outputs = before
            return await self._settle_interrupted(assignment, error)
        if not isinstance(outcome, bool):
            await self._record_not_done(assignment, outcome)
            return False
        return outcome

    async def _transactional_attempt(
        self, conn: psycopg.AsyncConnection[Any], assignment: Assignment
    ) -> bool | StepFailed | StepSnoozed:
        """The attempt and, when it succeeds, its completion, in one transaction.

        A failed attempt's writes are rolled back; its failure is returned to be recorded
        outside the transaction.
        """
        try:
            async with conn.transaction():
                store = Store(conn)
                await store.unpin_hot_plans()  # the step's own SQL plans as configured
                outcome = await self._run(assignment, replace(self._context(assignment), connection=conn))
                if isinstance(outcome, StepSucceeded):
                    async with conn.pipeline():  # the pins and the completion in one round trip
                        await store.pin_hot_plans()
                        result = await self._completion(assignment, outcome, transaction=store)()
                    return self._advance(assignment, outcome, result)
                raise _AttemptFailed(outcome)
        except _AttemptFailed as failed:
            # Rolled back; or, when the connection died meanwhile, rolled back by the
            # server (psycopg passes our exception on after its ROLLBACK fails, where it
            # would pass psycopg.Rollback on, which nothing here expects).
            return failed.outcome

    # Steps that wait for an event.

    async def _wait_for_event(self, assignment: Assignment) -> bool:
        """A step declared with wait_for_event: take its event and complete the step with
        the event's payload, or park the workflow until an event comes (or the wait's
        timeout), in one transaction that holds the workflow's row (see lock_for_wait)."""
        try:
            async with self.pool.connection() as conn:
                outcome = await self._waiting_transaction(conn, assignment)
        except DATABASE_ERRORS as error:
            return await self._settle_interrupted(assignment, error)
        if not isinstance(outcome, bool):
            await self._record_not_done(assignment, outcome)
            return False
        return outcome

    async def _waiting_transaction(
        self, conn: psycopg.AsyncConnection[Any], assignment: Assignment
    ) -> bool | StepFailed | StepSnoozed:
        """True or False (go on or not) when the step completed or parked; the failure
        when it cannot (its wait timed out), to be recorded outside the transaction."""
        try:
            async with conn.transaction():
                return await self._wait_in(Store(conn), assignment)
        except _AttemptFailed as failed:  # rolled back: no event consumed
            return failed.outcome

    async def _wait_in(self, store: Store, assignment: Assignment) -> bool:
        step, name = assignment.step, str(assignment.step.wait_for_event)
        workflow_id, step_index = assignment.workflow_id, assignment.step_index
        lock = await store.lock_for_wait(
            workflow_id=workflow_id, lease_token=assignment.lease_token, step_index=step_index,
            wait_seconds=step.timeout,
        )  # fmt: skip
        if lock is None:
            raise LeaseLostError
        payload = await store.take_event(workflow_id=workflow_id, step_index=step_index, name=name)
        if payload is not None:
            return await self._complete_with_event(store, assignment, payload)
        if lock["timed_out"]:
            message = f"no event {name!r} came within {step.timeout:g} s"
            timed_out = failure(step.name, assignment.attempt, "EventTimeout", message, retryable=False)
            self._trace_attempt("failed", timed_out)
            raise _AttemptFailed(timed_out)
        left = lock["seconds_left"] or SNOOZE_SECONDS_MAX
        parked = await store.snooze_step(
            workflow_id=workflow_id, lease_token=assignment.lease_token, step_index=step_index,
            attempt=assignment.attempt, worker_id=self.id, seconds=min(max(left, 0.001), SNOOZE_SECONDS_MAX),
            reason=f"waiting for event {name!r}",
        )  # fmt: skip
        if not parked:
            raise LeaseLostError
        assignment.ended = "waiting_for_event"
        self._trace_attempt("waiting")
        self._log(assignment).info("waiting_for_event", awaited=name)
        return False

    async def _complete_with_event(self, store: Store, assignment: Assignment, payload: str) -> bool:
        """The step's output is the event's payload, read as the definition reads JSON."""
        definition = assignment.definition
        event = StepSucceeded(definition.read_json(payload), payload)
        outcome: StepSucceeded | StepFailed = event
        if assignment.step_index == len(definition.steps) - 1:
            outcome = with_workflow_output(
                definition, event, input=assignment.input, outputs=assignment.outputs,
                step=assignment.step, attempt=assignment.attempt,
            )  # fmt: skip
        if isinstance(outcome, StepFailed):
            self._trace_attempt("failed", outcome)
            raise _AttemptFailed(outcome)  # the event is not consumed after all
        self._trace_attempt("succeeded")
        result = await self._completion(assignment, outcome, transaction=store)()
        return self._advance(assignment, outcome, result)

    async def _settle_interrupted(self, assignment: Assignment, error: Exception) -> bool:
        # The connection broke mid-transaction: nothing of it committed, unless the break
        # came with the COMMIT itself. Settle which from the rows.
        self._log(assignment).warning("transactional_step_interrupted", error=str(error).strip())
        step = await self._fenced(
            assignment, lambda: self.store.get_step(assignment.workflow_id, assignment.step_index)
        )
        in_flight = "compensating" if assignment.compensating else "running"
        attempt = step and (step.compensation_attempt if assignment.compensating else step.attempt)
        if step is not None and step.state == in_flight and attempt == assignment.attempt:
            # Its writes rolled back, but what it did outside the database stands: a step
            # that must not run twice has an unknown outcome.
            ending = f"{type(error).__name__}: {str(error).strip()}"
            if assignment.compensating or assignment.step.is_idempotent:
                outcome = failure(assignment.step.name, assignment.attempt, type(error).__name__, ending,
                                  retryable=True)  # fmt: skip
            else:
                outcome = outcome_unknown(assignment.step, assignment.attempt, ending)
            await self._record_failure(assignment, outcome)
            return False
        settled = await self._settle(assignment)
        if settled is None:
            assignment.ended = "lease_lost"
            return False
        return self._move_to(assignment, settled)

    # Writes through outages.

    async def _fenced(
        self,
        assignment: Assignment,
        write: Callable[[], Awaitable[T]],
        settle: Callable[[Assignment], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run a lease-fenced write, retrying through database outages while the lease lasts.

        Raises LeaseLostError when the write finds the lease gone. A write whose
        connection dropped may have landed anyway: when its retry then finds nothing to
        fence on, `settle` (for completions) reads the workflow back, and its answer is
        returned in place of the write's. A failure write that landed reads as a lost
        lease: either way this worker is done with the workflow.
        """
        delay = 0.05
        uncertain = False
        while True:
            try:
                result = await write()
                # Read back inside the retry: the outage that lost the answer may not
                # be over.
                if not result and uncertain and settle is not None:
                    settled = await settle(assignment)
                    if settled is not None:
                        return settled
            except DATABASE_ERRORS as error:
                self.metrics.database_errors.labels("commit").inc()
                if time.monotonic() + delay >= assignment.lease_deadline:
                    raise LeaseLostError from error
                self.log.warning(
                    "commit_retry", workflow_id=str(assignment.workflow_id), error=str(error).strip()
                )
                uncertain = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_DELAY_MAX_SECONDS)
                continue
            if result:
                return result
            raise LeaseLostError

    async def _settle(self, assignment: Assignment) -> Advanced | None:
        """After a completion's answer was lost: did it land? Its step then holds this
        attempt's result; the workflow went straight on under our lease (follow it), or
        was released or finished. None: it did not land, the lease was lost."""
        written = await self.store.get_step(assignment.workflow_id, assignment.step_index)
        if written is None:
            return None
        done, attempt = (
            ("compensated", written.compensation_attempt)
            if assignment.compensating
            else ("completed", written.attempt)
        )
        if written.state != done or attempt != assignment.attempt:
            return None
        progress = await self.store.get_step_progress(assignment.workflow_id)
        assert progress is not None  # the step row exists, so does its workflow
        went_on = (
            progress.lease_token == assignment.lease_token
            and progress.current_step_index != assignment.step_index
            and progress.step_state in ("running", "compensating")
        )
        if not went_on:
            finished = progress.workflow_state in ("completed", "compensated")
            return Advanced(assignment.workflow_id, finished, None, None, None)
        return Advanced(
            id=assignment.workflow_id,
            was_last=False,
            next_step_index=progress.current_step_index,
            next_attempt=progress.attempt,
            next_retry_count=progress.retry_count,
        )
