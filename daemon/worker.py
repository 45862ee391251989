"""The worker: claims due workflows, runs their steps, commits fenced results.

One `Worker` per process. The claim loop fills free concurrency slots with one claim
statement per batch; each claimed workflow is driven by a task that runs its steps (or,
in a compensating workflow, its compensations) one after the other while it holds the
lease; a heartbeat renews every in-flight lease in one statement; a listener wakes the
claim loop on inserts. Shutdown is two-phase: stop claiming and let steps finish within
the grace period, then cancel the rest and release their leases.
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
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast
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
from engine.runner import StepFailed, StepOutcome, StepSucceeded, failure, run_compensation, run_step
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
    cancel_requested: bool = False

    @property
    def step(self) -> Step:
        return self.definition.steps[self.step_index]


class LeaseLostError(Exception):
    """The lease ran out, or was taken over, before the result could be committed."""


class Worker:
    """Claims and runs workflows of the registry's types until asked to stop."""

    def __init__(
        self, pool: AsyncConnectionPool, conninfo: str, registry: Registry, config: WorkerConfig
    ) -> None:
        self.pool = pool
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
        side_tasks = [asyncio.create_task(self.listener.run()), asyncio.create_task(self._heartbeat_loop())]
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
                    # A bug must not stop the daemon: the claim's transaction rolled back,
                    # so nothing is lost; say so loudly and go on.
                    self.log.exception("claim_crashed", retry_in=CLAIM_RETRY_DELAY_MAX_SECONDS)
                    await asyncio.sleep(CLAIM_RETRY_DELAY_MAX_SECONDS)
                    continue
                if claimed == free:
                    continue  # more may be due: claim again while slots are free
            # Woken by a notification, a freed slot or a stop; else poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)

    async def _drain(self) -> None:
        if not self.tasks:
            return
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
        """Renew every in-flight lease in one statement; pass on cancel requests."""
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
                assignment.cancel_requested = renewed[assignment.workflow_id]
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
        validated); a cancel request is honoured here, at the step boundary; a
        non-idempotent step that was interrupted is failed, not rerun.
        """
        fresh, assignments = [], []
        for row in rows:
            definition = self.registry.get(row["type"])
            assert definition is not None  # the claim asked only for registered types
            if row["state"] == "running" and row["cancel_requested"]:
                await self._cancel(tx, row, definition)
                continue
            problem = self._refusal(row, definition)
            if problem is not None:
                await self._refuse(tx, row, definition, problem)
                continue
            if row["previous_step_state"] is None:
                fresh.append((row, definition))
            assignments.append(
                Assignment(
                    workflow_id=row["id"],
                    definition=definition,
                    row=row,
                    compensating=row["state"] == "compensating",
                    step_index=row["current_step_index"],
                    attempt=row["attempt"] or 1,
                    retry_count=row["retry_count"] or 0,
                    lease_token=row["lease_token"],
                    lease_deadline=deadline,
                    outputs=dict(row["context"] or {}),
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
            return self._input_refusal(row, definition)
        if row["state"] == "running" and row["previous_step_state"] == "running" and not row["step_started"]:
            step = definition.steps[index]
            message = (
                f"outcome unknown: the worker running step {step.name!r} (attempt {row['attempt']}) "
                "stopped before recording its result, and the step is not idempotent, so it is not run again"
            )
            return failure(step.name, row["attempt"], "OutcomeUnknown", message, retryable=False)
        if not row["step_started"]:
            message = f"step {index} of the workflow is {row['previous_step_state']} and cannot run now"
            return failure(
                definition.steps[index].name, row["attempt"], "StateMismatch", message, retryable=False
            )
        return None

    @staticmethod
    def _input_refusal(row: Row, definition: Workflow) -> StepFailed | None:
        try:
            definition.validate_input(row["input"])
        except InputValidationError as error:
            refused = failure("", 0, "InputValidationError", str(error), retryable=False)
            return StepFailed({**refused.error, "messages": error.messages}, "", retryable=False)
        except Exception as error:  # a broken validator fails its workflow, not the daemon
            message = f"the input model of {definition.type!r} raised {type(error).__name__}: {error}"
            return failure("", 0, "InputValidationError", message, retryable=False)
        return None

    async def _refuse(self, tx: Store, row: Row, definition: Workflow, outcome: StepFailed) -> None:
        """Fail a just-claimed workflow that must not run, inside the claiming transaction."""
        await tx.fail_workflow(
            workflow_id=row["id"],
            lease_token=row["lease_token"],
            step_index=row["current_step_index"],
            attempt=row["attempt"],
            error=outcome.error,
            traceback=outcome.traceback,
            worker_id=self.id,
            compensation=row["state"] == "compensating",
        )
        # The definition decides: a row inserted by SQL learns requires_compensation only now.
        if definition.requires_compensation and row["state"] == "running":
            await tx.begin_compensation(workflow_id=row["id"], worker_id=self.id)
        self.log.error(
            "workflow_refused", workflow_id=str(row["id"]), type=row["type"], error=outcome.error["message"]
        )

    async def _cancel(self, tx: Store, row: Row, definition: Workflow) -> None:
        """Honour a cancel request at this step boundary, inside the claiming transaction."""
        await tx.cancel_at_boundary(workflow_id=row["id"], lease_token=row["lease_token"], worker_id=self.id)
        if definition.requires_compensation:
            await tx.begin_compensation(workflow_id=row["id"], worker_id=self.id)
        self.log.info("workflow_cancelled", workflow_id=str(row["id"]), type=row["type"])

    async def _create_steps(self, tx: Store, fresh: list[tuple[Row, Workflow]]) -> None:
        steps: list[Row] = []
        shapes: list[Row] = []
        for row, definition in fresh:
            shapes.append(
                {
                    "id": row["id"],
                    "total_steps": len(definition.steps),
                    "max_retries": definition.max_retries,
                    "requires_compensation": definition.requires_compensation,
                }
            )
            steps.extend(
                {
                    "workflow_id": row["id"],
                    "step_index": index,
                    "step_name": step.name,
                    "max_retries": step.retries(definition.max_retries),
                    "is_idempotent": step.is_idempotent,
                    "requires_compensation": step.compensate is not None,
                    "config": dict(step.config),
                }
                for index, step in enumerate(definition.steps)
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
            go_on = True
            while go_on:
                step_log = log.bind(step=assignment.step.name, attempt=assignment.attempt)
                if assignment.step.transactional and not assignment.compensating:
                    go_on = await self._run_transactional(assignment, step_log)
                    continue
                outcome = await self._run(assignment)
                # The write is shielded: a shutdown cancels further steps, not a result.
                write = asyncio.ensure_future(self._record(assignment, outcome, step_log))
                try:
                    go_on = await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    raise
        except LeaseLostError:
            self.lost_leases += 1
            log.warning("lease_lost", step=assignment.step.name, attempt=assignment.attempt)
        finally:
            self.in_flight.pop(assignment.workflow_id, None)

    async def _run(self, assignment: Assignment) -> StepOutcome:
        ctx = self._context(assignment)
        input = assignment.row["input"]
        if assignment.compensating:
            output = assignment.outputs.get(assignment.step.name)
            return await run_compensation(assignment.step, input, output, ctx, self.executor)
        return await run_step(assignment.step, input, ctx, self.executor)

    def _context(self, assignment: Assignment) -> WorkflowContext:
        row = assignment.row
        step = assignment.step
        return WorkflowContext(
            workflow_id=assignment.workflow_id,
            workflow_type=assignment.definition.type,
            step_name=step.name,
            step_index=assignment.step_index,
            # The same function as the SQL that filled the step row's key (a test proves it).
            idempotency_key=step_idempotency_key(row["idempotency_key"], step.name, row["input"]),
            attempt=assignment.attempt,
            outputs=dict(assignment.outputs),
            config=step.config,
            user_id=row["user_id"],
            wallet_address=row["wallet_address"],
            cancel_check=lambda: assignment.cancel_requested,
        )

    async def _record(
        self, assignment: Assignment, outcome: StepOutcome, log: Any, store: Store | None = None
    ) -> bool:
        """Commit an attempt's outcome; returns whether to go straight on to the next step."""
        if isinstance(outcome, StepSucceeded):
            return await self._complete(assignment, outcome.output, log, store or self.store)
        step = assignment.step
        retries = step.retries(assignment.definition.max_retries)
        failing: dict[str, Any] = {
            "workflow_id": assignment.workflow_id,
            "lease_token": assignment.lease_token,
            "step_index": assignment.step_index,
            "attempt": assignment.attempt,
            "error": outcome.error,
            "traceback": outcome.traceback,
            "worker_id": self.id,
            "compensation": assignment.compensating,
        }
        if outcome.retryable and assignment.retry_count < retries:
            delay = self.config.retry_policy.delay(assignment.retry_count)
            await self._fenced(assignment, lambda: self.store.schedule_retry(**failing, delay_seconds=delay))
            log.warning("step_retry_scheduled", error=outcome.error["message"], delay_seconds=round(delay, 3))
            return False
        if assignment.compensating:
            await self._fenced(assignment, lambda: self.store.fail_workflow(**failing))
            log.error("compensation_failed", error=outcome.error["message"])
            return False
        await self._fenced(assignment, lambda: self._fail_forward(failing, assignment))
        log.error("workflow_failed", error=outcome.error["message"])
        return False

    async def _fail_forward(self, failing: dict[str, Any], assignment: Assignment) -> bool:
        # A workflow that requires compensation starts undoing its steps in the same
        # transaction that fails it.
        async with self.store.transaction() as tx:
            failed = await tx.fail_workflow(**failing)
            if failed and assignment.definition.requires_compensation:
                await tx.begin_compensation(workflow_id=assignment.workflow_id, worker_id=self.id)
            return failed

    async def _complete(self, assignment: Assignment, output: Any, log: Any, store: Store) -> bool:
        go_on = not self.stopping.is_set()
        common: dict[str, Any] = {
            "workflow_id": assignment.workflow_id,
            "lease_token": assignment.lease_token,
            "step_index": assignment.step_index,
            "attempt": assignment.attempt,
            "go_on": go_on,
            "lease_seconds": self.config.lease_seconds,
            "worker_id": self.id,
        }
        if assignment.compensating:
            write: Callable[[], Awaitable[Row | None]] = lambda: store.complete_compensation(**common)  # noqa: E731
        else:
            write = lambda: store.complete_step(**common, output=output)  # noqa: E731
        result = await write() if store is not self.store else await self._fenced(assignment, write)
        if result is None:
            raise LeaseLostError
        if not assignment.compensating:
            assignment.outputs[assignment.step.name] = output
        log.debug("step_completed", compensating=assignment.compensating)
        if result["was_last"]:
            log.info("workflow_compensated" if assignment.compensating else "workflow_completed")
        if result["next_step_index"] is None:
            return False
        assignment.step_index = result["next_step_index"]
        assignment.attempt = result["next_attempt"]
        assignment.retry_count = result["next_retry_count"]
        assignment.lease_deadline = time.monotonic() + self.config.lease_seconds
        return True

    async def _run_transactional(self, assignment: Assignment, log: Any) -> bool:
        """Run a transactional step inside the transaction that records its completion.

        The step's own writes and its completion commit together or not at all: a lost
        lease or a crash rolls both back, so its database effects happen exactly once.
        """
        before = (assignment.step_index, assignment.attempt, assignment.retry_count, dict(assignment.outputs))
        try:
            async with self.pool.connection() as conn:
                return await self._transactional_attempt(conn, assignment, log)
        except DATABASE_ERRORS as error:
            # The connection broke mid-transaction: nothing of it committed, unless the
            # break came with the COMMIT itself. Settle which from the rows.
            log.warning("transactional_step_interrupted", error=str(error).strip())
            assignment.step_index, assignment.attempt, assignment.retry_count, assignment.outputs = before
            step = await self._fenced(
                assignment, lambda: self.store.get_step(assignment.workflow_id, assignment.step_index)
            )
            if step is not None and step["state"] == "running" and step["attempt"] == assignment.attempt:
                retry = failure(
                    assignment.step.name, assignment.attempt, type(error).__name__, str(error), retryable=True
                )
                return await self._record(assignment, retry, log)
            settled = await self._settle(assignment)
            return settled is not None and self._advance(assignment, settled)

    async def _transactional_attempt(
        self, conn: psycopg.AsyncConnection[Any], assignment: Assignment, log: Any
    ) -> bool:
        outcome: StepOutcome | None = None
        async with conn.transaction():
            ctx = replace(self._context(assignment), connection=conn)
            outcome = await run_step(assignment.step, assignment.row["input"], ctx, self.executor)
            if isinstance(outcome, StepSucceeded):
                return await self._record(assignment, outcome, log, store=Store(conn))
            raise psycopg.Rollback  # a failed attempt's writes are undone
        assert isinstance(outcome, StepFailed)
        return await self._record(assignment, outcome, log)

    def _advance(self, assignment: Assignment, settled: Row) -> bool:
        assignment.step_index = settled["next_step_index"]
        assignment.attempt = settled["next_attempt"]
        assignment.retry_count = settled["next_retry_count"]
        assignment.lease_deadline = time.monotonic() + self.config.lease_seconds
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
