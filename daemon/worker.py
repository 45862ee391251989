"""The worker: claims due workflows, runs their steps, commits fenced results.

One `Worker` per process. The claim loop fills free concurrency slots with one claim
statement per batch; each claimed workflow is driven by a task that runs its steps one
after the other while it holds the lease; a heartbeat renews every in-flight lease in
one statement; a listener wakes the claim loop on inserts. Shutdown is two-phase: stop
claiming and let steps finish within the grace period, then cancel the rest and release
their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.wakeup import Listener
from engine.definitions import Step, Workflow, WorkflowContext
from engine.errors import InputValidationError
from engine.idempotency import step_idempotency_key
from engine.registry import Registry
from engine.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from engine.runner import StepFailed, StepSucceeded, failure, run_step
from engine.store import Row, Store

LOG = structlog.get_logger("workflowd.worker")
T = TypeVar("T")

# Errors that mean "the database is not answering right now", to ride out with backoff.
DATABASE_ERRORS = (psycopg.OperationalError, PoolTimeout)
DB_RETRY_DELAY_MAX_SECONDS = 2.0
CLAIM_RETRY_DELAY_MAX_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to know, read once from the settings."""

    concurrency: int
    lease_seconds: float
    poll_interval: float
    shutdown_grace: float
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    )
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY


@dataclass
class Assignment:
    """A claimed workflow this worker is driving, and the lease it holds on it."""

    workflow_id: UUID
    definition: Workflow
    row: Row
    step_index: int
    attempt: int
    retry_count: int
    lease_token: UUID
    # Monotonic time after which another worker may own the workflow.
    lease_deadline: float
    outputs: dict[str, Any]

    @property
    def step(self) -> Step:
        return self.definition.steps[self.step_index]


class LeaseLostError(Exception):
    """The lease ran out before the result could be committed."""


class Worker:
    """Claims and runs workflows of the registry's types until asked to stop."""

    def __init__(
        self, pool: AsyncConnectionPool, conninfo: str, registry: Registry, config: WorkerConfig
    ) -> None:
        self.store = Store(pool)
        self.registry = registry
        self.config = config
        self.id = config.worker_id
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.listener = Listener(conninfo, self.wake)
        self.in_flight: dict[UUID, Assignment] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="step")
        self.lost_leases = 0
        self.last_loop_at = time.monotonic()
        self.log = LOG.bind(worker=self.id)

    # The process side: run until stopped.

    async def run(self) -> None:
        """Register, then claim and run workflows until `request_stop`; then drain."""
        await self.store.register_worker(
            worker_id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            types=self.registry.types,
            concurrency=self.config.concurrency,
        )
        self.log.info("worker_started", types=self.registry.types, concurrency=self.config.concurrency)
        side_tasks = [
            asyncio.create_task(self.listener.run()),
            asyncio.create_task(self._heartbeat_loop()),
        ]
        for task in side_tasks:
            task.add_done_callback(self._side_task_done)
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await self._ignore_database_errors(self.store.stop_worker(worker_id=self.id))
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.log.info("worker_stopped", lost_leases=self.lost_leases)

    def request_stop(self) -> None:
        """Stop claiming; in-flight steps get the grace period to finish."""
        if not self.stopping.is_set():
            self.log.info("worker_stopping", in_flight=len(self.in_flight))
        self.stopping.set()
        self.wake.set()

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        # A side loop must never end on its own: if one crashes, stop loudly rather than
        # run on without heartbeats or wake-ups.
        if not task.cancelled() and task.exception() is not None:
            self.log.critical("side_task_crashed", error=repr(task.exception()))
            self.request_stop()

    async def _claim_loop(self) -> None:
        delay = 0.1
        while not self.stopping.is_set():
            self.last_loop_at = time.monotonic()
            self.wake.clear()
            free = self.config.concurrency - len(self.tasks)
            if free > 0:
                try:
                    claimed = await self.claim_once(free)
                    delay = 0.1
                except DATABASE_ERRORS as error:
                    self.log.warning("claim_failed", error=str(error).strip(), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, CLAIM_RETRY_DELAY_MAX_SECONDS)
                    continue
                except Exception:
                    # A bug or a row we cannot handle must not stop the daemon: the claim's
                    # transaction rolled back, so nothing is lost; say so loudly and go on.
                    self.log.exception("claim_crashed", retry_in=CLAIM_RETRY_DELAY_MAX_SECONDS)
                    await asyncio.sleep(CLAIM_RETRY_DELAY_MAX_SECONDS)
                    continue
                if claimed == free:
                    continue  # more may be due: claim again while slots are free
            # Woken by a notification, a freed slot or a stop; else poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)

    async def _drain(self) -> None:
        if self.tasks:
            self.log.info("draining", in_flight=len(self.tasks), grace_seconds=self.config.shutdown_grace)
            _, pending = await asyncio.wait(self.tasks, timeout=self.config.shutdown_grace)
            unfinished = [assignment.lease_token for assignment in self.in_flight.values()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if unfinished:
                released = await self._ignore_database_errors(
                    self.store.release_leases(worker_id=self.id, lease_tokens=unfinished)
                )
                self.log.warning("leases_released", count=len(released or ()))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_seconds / 3)
            await self.heartbeat_once()

    async def heartbeat_once(self) -> None:
        """Renew every in-flight lease in one statement; note the ones that were lost."""
        assignments = list(self.in_flight.values())
        sent_at = time.monotonic()
        try:
            renewed = await self.store.renew_leases(
                worker_id=self.id,
                lease_tokens=[assignment.lease_token for assignment in assignments],
                lease_seconds=self.config.lease_seconds,
            )
        except DATABASE_ERRORS as error:
            self.log.warning("heartbeat_failed", error=str(error).strip())
            return
        for assignment in assignments:
            if assignment.workflow_id in renewed:
                assignment.lease_deadline = sent_at + self.config.lease_seconds
            elif assignment.workflow_id in self.in_flight:
                self.log.warning("lease_not_renewed", workflow_id=str(assignment.workflow_id))

    async def _ignore_database_errors(self, operation: Awaitable[T]) -> T | None:
        try:
            return await operation
        except DATABASE_ERRORS as error:
            self.log.warning("database_unavailable", error=str(error).strip())
            return None

    # Claiming.

    async def claim_once(self, limit: int) -> int:
        """Claim up to `limit` due workflows and start a task for each; returns how many."""
        claimed_at = time.monotonic()
        async with self.store.transaction() as tx:
            rows = await tx.claim_due_workflows(
                worker_id=self.id,
                types=self.registry.types,
                limit=limit,
                lease_seconds=self.config.lease_seconds,
            )
            assignments = await self._prepare(tx, rows, claimed_at + self.config.lease_seconds)
        for assignment in assignments:
            self._spawn(assignment)
        return len(rows)

    async def _prepare(self, tx: Store, rows: list[Row], deadline: float) -> list[Assignment]:
        """Turn claimed rows into assignments, inside the claiming transaction.

        Workflows claimed for the first time get their step rows (after their input is
        validated); a non-idempotent step that was interrupted is failed, not rerun.
        """
        fresh, assignments = [], []
        for row in rows:
            definition = self.registry.get(row["type"])
            assert definition is not None  # the claim asked only for registered types
            problem = self._refusal(row, definition)
            if problem is not None:
                await self._refuse(tx, row, problem)
                continue
            if row["previous_step_state"] is None:
                fresh.append((row, definition))
            attempt = row["attempt"] or 1
            retry_count = row["step_retry_count"] or 0
            outputs = dict(row["context"] or {})
            assignments.append(
                Assignment(
                    row["id"],
                    definition,
                    row,
                    row["current_step_index"],
                    attempt,
                    retry_count,
                    row["lease_token"],
                    deadline,
                    outputs,
                )
            )
        if fresh:
            await self._create_steps(tx, fresh)
        return assignments

    def _refusal(self, row: Row, definition: Workflow) -> StepFailed | None:
        """Why this claimed workflow must fail instead of running, if it must."""
        index = row["current_step_index"]
        if index >= len(definition.steps):
            steps = len(definition.steps)
            message = f"the definition of {definition.type!r} has {steps} steps; the workflow is at {index}"
            return failure("", 0, "DefinitionMismatch", message, retryable=False)
        if row["previous_step_state"] is None:
            try:
                definition.validate_input(row["input"])
            except InputValidationError as error:
                refused = failure("", 0, "InputValidationError", str(error), retryable=False)
                return StepFailed({**refused.error, "messages": error.messages}, "", retryable=False)
            except Exception as error:  # a broken validator fails its workflow, not the daemon
                message = f"the input model of {definition.type!r} raised {type(error).__name__}: {error}"
                return failure("", 0, "InputValidationError", message, retryable=False)
        if row["previous_step_state"] == "running" and not row["step_started"]:
            step = definition.steps[index]
            message = (
                f"outcome unknown: the worker running step {step.name!r} (attempt {row['attempt']}) "
                "stopped before recording its result, and the step is not idempotent, so it is not run again"
            )
            return failure(step.name, row["attempt"], "OutcomeUnknown", message, retryable=False)
        return None

    async def _create_steps(self, tx: Store, fresh: list[tuple[Row, Workflow]]) -> None:
        steps, shapes = [], []
        for row, definition in fresh:
            shapes.append(
                {
                    "id": row["id"],
                    "total_steps": len(definition.steps),
                    "max_retries": definition.max_retries,
                    "requires_compensation": definition.requires_compensation,
                }
            )
            for index, step in enumerate(definition.steps):
                steps.append(
                    {
                        "workflow_id": row["id"],
                        "step_index": index,
                        "step_name": step.name,
                        "max_retries": step.retries(definition.max_retries),
                        "is_idempotent": step.is_idempotent,
                        "requires_compensation": step.compensate is not None,
                        "config": dict(step.config),
                    }
                )
        await tx.create_steps(worker_id=self.id, steps=steps, shapes=shapes)

    def _spawn(self, assignment: Assignment) -> None:
        self.in_flight[assignment.workflow_id] = assignment
        task = asyncio.create_task(self._drive(assignment))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            self.log.error("workflow_task_crashed", error=repr(task.exception()))

    # Driving one workflow.

    async def _drive(self, assignment: Assignment) -> None:
        log = self.log.bind(workflow_id=str(assignment.workflow_id), type=assignment.definition.type)
        try:
            while True:
                step = assignment.step
                step_log = log.bind(step=step.name, attempt=assignment.attempt)
                step_log.debug("step_started")
                outcome = await run_step(
                    step, assignment.row["input"], self._context(assignment), self.executor
                )
                # The write is shielded: a shutdown cancels further steps, not a result.
                write = asyncio.ensure_future(self._record(assignment, outcome, step_log))
                try:
                    go_on = await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    raise
                if not go_on:
                    return
        except LeaseLostError:
            self.lost_leases += 1
            log.warning("lease_lost", step=assignment.step.name, attempt=assignment.attempt)
        finally:
            self.in_flight.pop(assignment.workflow_id, None)

    def _context(self, assignment: Assignment) -> WorkflowContext:
        row = assignment.row
        step = assignment.step
        return WorkflowContext(
            workflow_id=assignment.workflow_id,
            workflow_type=assignment.definition.type,
            step_name=step.name,
            step_index=assignment.step_index,
            idempotency_key=self._step_key(assignment),
            attempt=assignment.attempt,
            outputs=dict(assignment.outputs),
            config=step.config,
            user_id=row["user_id"],
            wallet_address=row["wallet_address"],
            cancel_requested=row["cancel_requested"],
        )

    @staticmethod
    def _step_key(assignment: Assignment) -> str:
        # The same function as the SQL that filled the step row's key (a test proves it).
        row = assignment.row
        return step_idempotency_key(row["idempotency_key"], assignment.step.name, row["input"])

    async def _record(self, assignment: Assignment, outcome: StepSucceeded | StepFailed, log: Any) -> bool:
        """Commit an attempt's outcome; returns whether to go straight on to the next step."""
        if isinstance(outcome, StepSucceeded):
            return await self._complete(assignment, outcome.output, log)
        step = assignment.step
        retries = step.retries(assignment.definition.max_retries)
        if outcome.retryable and assignment.retry_count < retries:
            delay = self.config.retry_policy.delay(assignment.retry_count)
            recorded = await self._fenced(
                assignment,
                lambda: self.store.schedule_retry(
                    workflow_id=assignment.workflow_id,
                    lease_token=assignment.lease_token,
                    step_index=assignment.step_index,
                    attempt=assignment.attempt,
                    error=outcome.error,
                    traceback=outcome.traceback,
                    delay_seconds=delay,
                    worker_id=self.id,
                ),
            )
            log.warning(
                "step_retry_scheduled",
                error=outcome.error["message"],
                delay_seconds=round(delay, 3),
            )
        else:
            recorded = await self._fenced(
                assignment,
                lambda: self.store.fail_workflow(
                    workflow_id=assignment.workflow_id,
                    lease_token=assignment.lease_token,
                    step_index=assignment.step_index,
                    attempt=assignment.attempt,
                    error=outcome.error,
                    traceback=outcome.traceback,
                    worker_id=self.id,
                ),
            )
            log.error("workflow_failed", error=outcome.error["message"])
        if not recorded:
            raise LeaseLostError
        return False

    async def _complete(self, assignment: Assignment, output: Any, log: Any) -> bool:
        go_on = not self.stopping.is_set()
        result = await self._fenced(
            assignment,
            lambda: self.store.complete_step(
                workflow_id=assignment.workflow_id,
                lease_token=assignment.lease_token,
                step_index=assignment.step_index,
                attempt=assignment.attempt,
                output=output,
                go_on=go_on,
                lease_seconds=self.config.lease_seconds,
                worker_id=self.id,
            ),
        )
        if result is None:
            raise LeaseLostError
        log.debug("step_completed")
        assignment.outputs[assignment.step.name] = output
        if result["was_last"]:
            log.info("workflow_completed")
        if result["next_step_index"] is None:
            return False
        assignment.step_index = result["next_step_index"]
        assignment.attempt = result["next_attempt"]
        assignment.retry_count = result["next_retry_count"]
        assignment.lease_deadline = time.monotonic() + self.config.lease_seconds
        return True

    async def _refuse(self, tx: Store, row: Row, outcome: StepFailed) -> None:
        """Fail a just-claimed workflow that must not run, inside the claiming transaction."""
        await tx.fail_workflow(
            workflow_id=row["id"],
            lease_token=row["lease_token"],
            step_index=row["current_step_index"],
            attempt=row["attempt"],
            error=outcome.error,
            traceback=outcome.traceback,
            worker_id=self.id,
        )
        self.log.error(
            "workflow_refused",
            workflow_id=str(row["id"]),
            type=row["type"],
            error=outcome.error["message"],
        )

    async def _fenced(self, assignment: Assignment, write: Callable[[], Awaitable[T]]) -> T | None:
        """Run a lease-fenced write, retrying through database outages while the lease lasts.

        A write whose connection dropped may have landed anyway; when its retry then finds
        the lease or the step moved on, the answer is settled by reading the workflow back.
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
                    "commit_retry",
                    workflow_id=str(assignment.workflow_id),
                    error=str(error).strip(),
                )
                uncertain = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_DELAY_MAX_SECONDS)
                continue
            if result or not uncertain:
                return result
            return await self._settle(assignment, result)

    async def _settle(self, assignment: Assignment, result: T) -> T:
        # The retried write found nothing to fence on: did our first try land? Only a
        # completion that went straight on still holds our lease; follow it from the row.
        progress = await self.store.get_step_progress(assignment.workflow_id)
        if (
            progress is not None
            and progress["lease_token"] == assignment.lease_token
            and progress["current_step_index"] == assignment.step_index + 1
            and progress["step_state"] == "running"
        ):
            settled: Any = {
                "was_last": False,
                "next_step_index": progress["current_step_index"],
                "next_attempt": progress["step_attempt"],
                "next_retry_count": progress["step_retry_count"],
            }
            return settled  # type: ignore[no-any-return]
        return result
