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
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import structlog
from psycopg_pool import AsyncConnectionPool

from daemon.driver import DATABASE_ERRORS, Assignment, Driver
from daemon.metrics import Metrics
from daemon.wakeup import Listener
from engine.definitions import Workflow
from engine.errors import InputValidationError, UnstorableValueError
from engine.idempotency import step_input_digest
from engine.registry import Registry
from engine.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from engine.runner import StepFailed, failure
from engine.store import FailedAttempt, Row, StepDefinitions, Store

LOG = structlog.get_logger("workflowd.worker")
T = TypeVar("T")

CLAIM_RETRY_DELAY_MAX_SECONDS = 5.0
# How long a busy worker may hold back a claim to make it a bigger batch.
CLAIM_WINDOW_SECONDS = 0.02


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


class Worker:
    """Claims and runs workflows of the registry's types until asked to stop."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        conninfo: str,
        registry: Registry,
        config: WorkerConfig,
        *,
        metrics: Metrics | None = None,
        on_loop: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = Store(pool)
        self.registry = registry
        self.step_definitions = StepDefinitions.of(registry)
        self.config = config
        self.id = config.worker_id
        self.metrics = metrics or Metrics()
        # Called on every turn of the claim loop (the systemd watchdog).
        self.on_loop = on_loop
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.listener = Listener(conninfo, self.wake)
        self.in_flight: dict[UUID, Assignment] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_loop_at = self.last_claim_at = time.monotonic()
        self.log = LOG.bind(worker=self.id)
        self.driver = Driver(
            pool,
            worker_id=self.id,
            concurrency=config.concurrency,
            retry_policy=config.retry_policy,
            metrics=self.metrics,
            stopping=self.stopping,
            log=self.log,
        )

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
            self.driver.executor.shutdown(wait=False, cancel_futures=True)
            self.log.info("worker_stopped", lost_leases=self.driver.lost_leases)

    @property
    def draining(self) -> bool:
        """Whether shutdown has begun (readiness turns false at once)."""
        return self.stopping.is_set()

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
            self.on_loop()
            self.wake.clear()
            free = self.config.concurrency - len(self.tasks)
            if self._worth_waiting_for_more_slots(free):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), CLAIM_WINDOW_SECONDS)
                continue
            if free > 0:
                try:
                    claimed = await self.claim_once(free)
                    delay = 0.1
                except DATABASE_ERRORS as error:
                    self.metrics.database_errors.labels("claim").inc()
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

    def _worth_waiting_for_more_slots(self, free: int) -> bool:
        # Under load slots free up one by one; a claim for each would cost a transaction
        # per workflow. Wait (briefly) until a quarter of the slots are free, so that a
        # claim fetches a batch; an idle worker claims at once.
        if not self.tasks or free >= max(1, self.config.concurrency // 4):
            return False
        return time.monotonic() - self.last_claim_at < CLAIM_WINDOW_SECONDS

    async def _drain(self) -> None:
        if not self.tasks:
            return
        self.log.info("draining", in_flight=len(self.tasks), grace_seconds=self.config.shutdown_grace)
        _, pending = await asyncio.wait(self.tasks, timeout=self.config.shutdown_grace)
        unfinished = {
            assignment.workflow_id: assignment.lease_token for assignment in self.in_flight.values()
        }
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if unfinished:
            released = await self._ignore_database_errors(
                self.store.release_leases(worker_id=self.id, leases=unfinished)
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
                leases={assignment.workflow_id: assignment.lease_token for assignment in assignments},
                lease_seconds=self.config.lease_seconds,
            )
        except DATABASE_ERRORS as error:
            self.metrics.database_errors.labels("heartbeat").inc()
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
        claimed_at = self.last_claim_at = time.monotonic()
        async with self.store.claiming_transaction() as tx:
            rows = await tx.claim_due_workflows(
                worker_id=self.id,
                types=self.registry.types,
                limit=limit,
                lease_seconds=self.config.lease_seconds,
            )
            assignments = await self._prepare(tx, rows, claimed_at + self.config.lease_seconds)
        self._count_claims(rows)
        for assignment in assignments:
            self._spawn(assignment)
        return len(rows)

    def _count_claims(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.metrics.claim_batch.observe(len(rows))
        for row in rows:
            self.metrics.pickup_lag.observe(max(0.0, row["pickup_lag_seconds"]))
            if row["previous_state"] == "pending":
                self.metrics.workflows_started.labels(row["type"]).inc()

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
            try:
                digest = step_input_digest(row["idempotency_key"], row["input"])
            except UnstorableValueError as error:  # valid jsonb, but a float overflow here (1e400 + .5)
                message = f"the input has no canonical form for idempotency keys: {error}"
                await self._refuse(
                    tx, row, definition, failure("", 0, "InputValidationError", message, retryable=False)
                )
                continue
            problem = self._refusal(row, definition)
            if problem is not None:
                await self._refuse(tx, row, definition, problem)
                continue
            assignment = Assignment(
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
                step_digest=digest,
            )
            if row["previous_step_state"] is None:
                fresh.append(assignment)
            assignments.append(assignment)
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
            FailedAttempt(
                row["id"], row["lease_token"], row["current_step_index"], row["attempt"],
                outcome.error, outcome.traceback, self.id, compensation=row["state"] == "compensating",
            )
        )  # fmt: skip
        # The definition decides: a row inserted by SQL learns requires_compensation only now.
        if definition.requires_compensation and row["state"] == "running":
            await tx.begin_compensation(workflow_id=row["id"], worker_id=self.id)
        else:
            self.metrics.workflows_finished.labels(row["type"], "failed").inc()
        self.log.error(
            "workflow_refused", workflow_id=str(row["id"]), type=row["type"], error=outcome.error["message"]
        )

    async def _cancel(self, tx: Store, row: Row, definition: Workflow) -> None:
        """Honour a cancel request at this step boundary, inside the claiming transaction."""
        await tx.cancel_at_boundary(workflow_id=row["id"], lease_token=row["lease_token"], worker_id=self.id)
        if definition.requires_compensation:
            await tx.begin_compensation(workflow_id=row["id"], worker_id=self.id)
        else:
            self.metrics.workflows_finished.labels(row["type"], "cancelled").inc()
        self.log.info("workflow_cancelled", workflow_id=str(row["id"]), type=row["type"])

    async def _create_steps(self, tx: Store, fresh: list[Assignment]) -> None:
        digests = {assignment.workflow_id: assignment.step_digest for assignment in fresh}
        await tx.create_steps(worker_id=self.id, digests=digests, definitions=self.step_definitions)

    def _spawn(self, assignment: Assignment) -> None:
        self.in_flight[assignment.workflow_id] = assignment
        self.metrics.in_flight.set(len(self.in_flight))
        task = asyncio.create_task(self._drive(assignment))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            self.log.error("workflow_task_crashed", error=repr(task.exception()))

    async def _drive(self, assignment: Assignment) -> None:
        try:
            await self.driver.drive(assignment)
        finally:
            self.in_flight.pop(assignment.workflow_id, None)
            self.metrics.in_flight.set(len(self.in_flight))
