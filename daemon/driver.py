"""Driving one claimed workflow: run its current step (or compensation), commit the
outcome fenced by the lease, and go straight on to the next step while the lease holds.

Every result write is fenced by the lease token; a write that meets a database outage
is retried while the lease lasts, and one whose answer a dropped connection lost is
settled by reading the workflow back. A transactional step runs inside the transaction
that records its completion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.group_commit import GroupCommit
from daemon.metrics import Metrics
from engine.definitions import Step, Workflow, WorkflowContext
from engine.idempotency import step_key
from engine.retry import RetryPolicy
from engine.runner import StepFailed, StepOutcome, StepSucceeded, failure, run_compensation, run_step
from engine.store import Completion, FailedAttempt, Row, Store

T = TypeVar("T")

# Errors that mean "the database is not answering right now", to ride out with backoff.
DATABASE_ERRORS = (psycopg.OperationalError, PoolTimeout)
DB_RETRY_DELAY_MAX_SECONDS = 2.0


@dataclass
class Assignment:
    """A claimed workflow this worker is driving, and the lease it holds on it.

    `attempt` and `retry_count` count the current step's attempts, or its compensation's
    when `compensating`.
    """

    workflow_id: UUID
    definition: Workflow
    row: Row
    compensating: bool
    step_index: int
    attempt: int
    retry_count: int
    lease_token: UUID
    # Monotonic time after which another worker may own the workflow.
    lease_deadline: float
    outputs: dict[str, Any]
    # The digest of the workflow's input in its steps' idempotency keys.
    step_digest: str
    cancel_requested: bool = False

    @property
    def step(self) -> Step:
        return self.definition.steps[self.step_index]


class LeaseLostError(Exception):
    """The lease ran out, or was taken over, before the result could be committed."""


class Driver:
    """Runs claimed workflows for one worker; shared by all its workflow tasks."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        worker_id: str,
        concurrency: int,
        retry_policy: RetryPolicy,
        metrics: Metrics,
        stopping: asyncio.Event,
        log: Any,
    ) -> None:
        self.pool = pool
        self.store = Store(pool)
        self.id = worker_id
        self.retry_policy = retry_policy
        self.metrics = metrics
        # Once set, completed steps do not go on to the next one (shutdown).
        self.stopping = stopping
        self.log = log
        self.group_commit = GroupCommit(self.store, worker_id=worker_id)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="step")
        self.lost_leases = 0

    async def drive(self, assignment: Assignment) -> None:
        """Run the workflow's steps one after the other while this worker holds its lease."""
        try:
            go_on = True
            while go_on:
                if assignment.step.transactional:
                    go_on = await self._run_transactional(assignment)
                    continue
                outcome = await self._run(assignment)
                # The write is shielded: a shutdown cancels further steps, not a result.
                write = asyncio.ensure_future(self._record(assignment, outcome))
                try:
                    go_on = await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    raise
        except LeaseLostError:
            self.lost_leases += 1
            self.metrics.lost_leases.inc()
            self._log(assignment).warning("lease_lost")

    def _log(self, assignment: Assignment) -> Any:
        # Bound only when there is something to say: binding costs, and steps are many.
        return self.log.bind(
            workflow_id=str(assignment.workflow_id), type=assignment.definition.type,
            step=assignment.step.name, attempt=assignment.attempt,
        )  # fmt: skip

    async def _run(self, assignment: Assignment, ctx: WorkflowContext | None = None) -> StepOutcome:
        """One attempt of the current step, or of its compensation."""
        ctx = ctx or self._context(assignment)
        input = assignment.row["input"]
        started = time.monotonic()
        if assignment.compensating:
            output = assignment.outputs.get(assignment.step.name)
            outcome = await run_compensation(assignment.step, input, output, ctx, self.executor)
        else:
            outcome = await run_step(assignment.step, input, ctx, self.executor)
        self._count_attempt(assignment, outcome, time.monotonic() - started)
        return outcome

    def _count_attempt(self, assignment: Assignment, outcome: StepOutcome, seconds: float) -> None:
        succeeded = isinstance(outcome, StepSucceeded)
        if assignment.compensating:
            result = "compensated" if succeeded else "compensation_failed"
        else:
            result = "succeeded" if succeeded else "failed"
        labels = (assignment.definition.type, assignment.step.name, result)
        self.metrics.step_duration.labels(*labels).observe(seconds)
        self.metrics.step_attempts.labels(*labels).inc()

    def _context(self, assignment: Assignment) -> WorkflowContext:
        row = assignment.row
        step = assignment.step
        return WorkflowContext(
            workflow_id=assignment.workflow_id,
            workflow_type=assignment.definition.type,
            step_name=step.name,
            step_index=assignment.step_index,
            idempotency_key=step_key(step.name, assignment.step_digest),
            attempt=assignment.attempt,
            outputs=dict(assignment.outputs),
            config=step.config,
            user_id=row["user_id"],
            wallet_address=row["wallet_address"],
            cancel_check=lambda: assignment.cancel_requested,
        )

    async def _record(self, assignment: Assignment, outcome: StepOutcome, store: Store | None = None) -> bool:
        """Commit an attempt's outcome; returns whether to go straight on to the next step."""
        if isinstance(outcome, StepSucceeded):
            return await self._complete(assignment, outcome.output, store or self.store)
        step = assignment.step
        retries = step.retries(assignment.definition.max_retries)
        failed = FailedAttempt(
            assignment.workflow_id, assignment.lease_token, assignment.step_index, assignment.attempt,
            outcome.error, outcome.traceback, self.id, compensation=assignment.compensating,
        )  # fmt: skip
        if outcome.retryable and assignment.retry_count < retries:
            delay = self.retry_policy.delay(assignment.retry_count)
            await self._fenced(assignment, lambda: self.store.schedule_retry(failed, delay_seconds=delay))
            self.metrics.retries.labels(assignment.definition.type, step.name).inc()
            self._log(assignment).warning(
                "step_retry_scheduled", error=outcome.error["message"], delay_seconds=round(delay, 3)
            )
            return False
        if assignment.compensating:
            await self._fenced(assignment, lambda: self.store.fail_workflow(failed))
            self._log(assignment).error("compensation_failed", error=outcome.error["message"])
        else:
            await self._fenced(assignment, lambda: self._fail_forward(failed, assignment))
            self._log(assignment).error("workflow_failed", error=outcome.error["message"])
        if assignment.compensating or not assignment.definition.requires_compensation:
            self.metrics.workflows_finished.labels(assignment.definition.type, "failed").inc()
        return False

    async def _fail_forward(self, failed: FailedAttempt, assignment: Assignment) -> bool:
        # A workflow that requires compensation starts undoing its steps in the same
        # transaction that fails it.
        async with self.store.transaction() as tx:
            recorded = await tx.fail_workflow(failed)
            if recorded and assignment.definition.requires_compensation:
                await tx.begin_compensation(workflow_id=assignment.workflow_id, worker_id=self.id)
            return recorded

    async def _complete(self, assignment: Assignment, output: Any, store: Store) -> bool:
        go_on = not self.stopping.is_set()
        write: Callable[[], Awaitable[Row | None]]
        if assignment.compensating:
            write = lambda: store.complete_compensation(  # noqa: E731
                workflow_id=assignment.workflow_id, lease_token=assignment.lease_token,
                step_index=assignment.step_index, attempt=assignment.attempt, go_on=go_on,
                worker_id=self.id,
            )  # fmt: skip
        else:
            completion = Completion(
                assignment.workflow_id, assignment.lease_token, assignment.step_index, assignment.attempt,
                output, go_on,
            )  # fmt: skip
            write = lambda: self._complete_steps(completion, store)  # noqa: E731
        result = await write() if store is not self.store else await self._fenced(assignment, write)
        if result is None:
            raise LeaseLostError
        if not assignment.compensating:
            assignment.outputs[assignment.step.name] = output
        if result["was_last"]:
            final = "compensated" if assignment.compensating else "completed"
            self._log(assignment).info(f"workflow_{final}")
            self.metrics.workflows_finished.labels(assignment.definition.type, final).inc()
        if result["next_step_index"] is None:
            return False
        return self._advance(assignment, result)

    async def _complete_steps(self, completion: Completion, store: Store) -> Row | None:
        # The hot path joins the group commit; a transactional step's completion goes in
        # its own transaction, with the step's writes.
        if store is self.store:
            return await self.group_commit.complete(completion)
        rows = await store.complete_steps([completion], worker_id=self.id)
        return rows.get(completion.workflow_id)

    async def _run_transactional(self, assignment: Assignment) -> bool:
        """Run a transactional step (or its compensation) inside the transaction that
        records its completion.

        The step's own writes and its completion commit together or not at all: a lost
        lease or a crash rolls both back, so its database effects happen exactly once.
        """
        before = (assignment.step_index, assignment.attempt, assignment.retry_count, dict(assignment.outputs))
        try:
            async with self.pool.connection() as conn:
                return await self._transactional_attempt(conn, assignment)
        except DATABASE_ERRORS as error:
            # The connection broke mid-transaction: nothing of it committed, unless the
            # break came with the COMMIT itself. Settle which from the rows.
            self._log(assignment).warning("transactional_step_interrupted", error=str(error).strip())
            assignment.step_index, assignment.attempt, assignment.retry_count, assignment.outputs = before
            step = await self._fenced(
                assignment, lambda: self.store.get_step(assignment.workflow_id, assignment.step_index)
            )
            in_flight = (
                ("compensating", "compensation_attempt")
                if assignment.compensating
                else ("running", "attempt")
            )
            if (
                step is not None
                and step["state"] == in_flight[0]
                and step[in_flight[1]] == assignment.attempt
            ):
                retry = failure(
                    assignment.step.name, assignment.attempt, type(error).__name__, str(error), retryable=True
                )
                return await self._record(assignment, retry)
            settled = await self._settle(assignment)
            return settled is not None and self._advance(assignment, settled)

    async def _transactional_attempt(
        self, conn: psycopg.AsyncConnection[Any], assignment: Assignment
    ) -> bool:
        outcome: StepOutcome | None = None
        async with conn.transaction():
            outcome = await self._run(assignment, replace(self._context(assignment), connection=conn))
            if isinstance(outcome, StepSucceeded):
                return await self._record(assignment, outcome, store=Store(conn))
            raise psycopg.Rollback  # a failed attempt's writes are undone
        assert isinstance(outcome, StepFailed)
        return await self._record(assignment, outcome)

    def _advance(self, assignment: Assignment, settled: Row) -> bool:
        """Move the assignment to the next step its completion started, under the same
        lease (the heartbeat keeps renewing it)."""
        assignment.step_index = settled["next_step_index"]
        assignment.attempt = settled["next_attempt"]
        assignment.retry_count = settled["next_retry_count"]
        return True

    async def _fenced(self, assignment: Assignment, write: Callable[[], Awaitable[T]]) -> T:
        """Run a lease-fenced write, retrying through database outages while the lease lasts.

        Raises LeaseLostError when the write finds the lease gone. A write whose
        connection dropped may have landed anyway: when its retry then finds nothing to
        fence on, the answer is settled by reading the workflow back.
        """
        delay = 0.05
        uncertain = False
        while True:
            try:
                result = await write()
            except DATABASE_ERRORS as error:
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
            # A failure write that landed before its connection dropped reads as a lost
            # lease here: either way this worker is done with the workflow.
            if uncertain and (settled := await self._settle(assignment)) is not None:
                return cast(T, settled)
            raise LeaseLostError

    async def _settle(self, assignment: Assignment) -> Row | None:
        # The retried write found nothing to fence on: did our first try land? Only a
        # completion that went straight on still holds our lease; follow it from the row.
        progress = await self.store.get_step_progress(assignment.workflow_id)
        if (
            progress is not None
            and progress["lease_token"] == assignment.lease_token
            and progress["current_step_index"] != assignment.step_index
            and progress["step_state"] in ("running", "compensating")
        ):
            compensating = progress["step_state"] == "compensating"
            return {
                "was_last": False,
                "next_step_index": progress["current_step_index"],
                "next_attempt": progress["step_compensation_attempt" if compensating else "step_attempt"],
                "next_retry_count": progress[
                    "step_compensation_retry_count" if compensating else "step_retry_count"
                ],
            }
        return None
