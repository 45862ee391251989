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
from typing import Any, TypeVar
from uuid import UUID

import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from daemon.driver import DATABASE_ERRORS, Assignment, Driver, DriverConfig
from daemon.metrics import Metrics
from daemon.tracing import Tracing
from daemon.wakeup import Listener
from engine.attempts import CancelAtBoundary, ClaimedWorkflow, Refuse, Run, decide
from engine.definitions import Workflow
from engine.flow import claim_limited
from engine.limits import TypeLimits, concurrency_limited, rate_limited
from engine.primary import connect_to_primary
from engine.registry import Registry
from engine.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from engine.store import FailedAttempt, StepDefinitions, Store

LOG = structlog.get_logger("workflowd.worker")
T = TypeVar("T")

CLAIM_RETRY_DELAY_MAX_SECONDS = 5.0
# How long a busy worker may hold back a claim to make it a bigger batch.
CLAIM_WINDOW_SECONDS = 0.02
# How often a worker reads the limits of its types (workflow_type_limits): a limit set at
# run time holds for its claims from then on.
LIMITS_REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to know, read once from the settings."""

    concurrency: int
    lease_seconds: float
    poll_interval: float
    shutdown_grace: float
    # Bounds every attempt of a step that sets no timeout of its own (None: unbounded).
    step_timeout: float | None = None
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
        tracing: Tracing | None = None,
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
        self.conninfo = conninfo
        self.listener = Listener(conninfo, self.wake)
        # The heartbeat's own connection: a pool that steps have exhausted must not
        # keep leases from being renewed.
        self.heartbeat_connection: AsyncConnection[Any] | None = None
        self.in_flight: dict[UUID, Assignment] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_loop_at = self.last_claim_at = time.monotonic()
        # The limits of its limited types, by type, and when they were read; the served
        # keys of its limited types and of the others (what each kind of claim asks for).
        self.limits: dict[str, TypeLimits] = {}
        self.limits_read_at = -LIMITS_REFRESH_SECONDS
        self.limited_served: list[str] = []
        self.unlimited_served = self.registry.served
        self.log = LOG.bind(worker=self.id)
        driver_config = DriverConfig(
            worker_id=self.id,
            concurrency=config.concurrency,
            lease_seconds=config.lease_seconds,
            retry_policy=config.retry_policy,
            step_timeout=config.step_timeout,
        )
        self.tracing = tracing
        self.driver = Driver(
            pool, driver_config, metrics=self.metrics, stopping=self.stopping, log=self.log, tracing=tracing
        )

    # The process side: run until stopped.

    async def run(self) -> None:
        """Register, then claim and run workflows until `request_stop`; then drain."""
        await self.store.register_worker(
            worker_id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            types=self.registry.types,
            priorities=self.registry.priorities,
            limits=self.registry.limits,
            served=self.registry.served,
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
            await self._close_heartbeat_connection()
            await self._ignore_database_errors(self.store.stop_worker(worker_id=self.id))
            self.driver.close()
            self.log.info("worker_stopped")

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

    def mark_alive(self) -> None:
        """The daemon's loop went round: what /livez looks at."""
        self.last_loop_at = time.monotonic()

    def beat(self) -> None:
        """The claim loop went round: for /livez and for systemd's watchdog."""
        self.mark_alive()
        self.on_loop()

    async def stopped_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for a stop request; whether one came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        # A side loop must never end on its own: if one crashes, stop loudly rather than
        # run on without heartbeats or wake-ups.
        if not task.cancelled() and task.exception() is not None:
            self.log.critical("side_task_crashed", error=repr(task.exception()))
            self.request_stop()

    async def _claim_loop(self) -> None:
        delay = 0.1
        while not self.stopping.is_set():
            self.beat()
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
                    # When the listener gets back in, the database is back: the claim
                    # need not sit out the rest of its backoff.
                    self.listener.connected.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.listener.connected.wait(), delay)
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
        """Renew every in-flight lease in one statement; pass on cancel requests.

        Bounded by a third of the lease, on a connection of its own. A lease that could
        not be renewed before its deadline is reported; its workflow does not go on to
        another step (see Driver._may_go_on), and its result, if any, is still fenced.
        """
        assignments = list(self.in_flight.values())
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(self.config.lease_seconds / 3):
                conn = await self._heartbeat_conn()
                renewals = await Store(conn).renew_leases(
                    worker_id=self.id,
                    leases={assignment.workflow_id: assignment.lease_token for assignment in assignments},
                    lease_seconds=self.config.lease_seconds,
                )
        except (*DATABASE_ERRORS, TimeoutError) as error:
            await self._close_heartbeat_connection()
            self.metrics.database_errors.labels("heartbeat").inc()
            self.log.warning("heartbeat_failed", error=str(error).strip() or type(error).__name__)
            self._report_expired(assignments)
            return
        for assignment in assignments:
            renewal = renewals.get(assignment.workflow_id)
            if renewal is None:
                if assignment.workflow_id in self.in_flight:
                    self.log.warning("lease_not_renewed", workflow_id=str(assignment.workflow_id))
                continue
            assignment.cancel_requested = renewal.cancel_requested
            if renewal.renewed:
                assignment.lease_deadline = sent_at + self.config.lease_seconds
        self._report_expired(assignments)

    def _report_expired(self, assignments: list[Assignment]) -> None:
        now = time.monotonic()
        for assignment in assignments:
            if assignment.lease_deadline < now and assignment.workflow_id in self.in_flight:
                self.log.warning("lease_expired", workflow_id=str(assignment.workflow_id))

    async def _heartbeat_conn(self) -> AsyncConnection[Any]:
        if self.heartbeat_connection is None or self.heartbeat_connection.closed:
            self.heartbeat_connection = await connect_to_primary(
                self.conninfo, autocommit=True, application_name="workflowd-heartbeat"
            )
        return self.heartbeat_connection

    async def _close_heartbeat_connection(self) -> None:
        if self.heartbeat_connection is not None:
            with contextlib.suppress(Exception):
                await self.heartbeat_connection.close()
            self.heartbeat_connection = None

    async def _ignore_database_errors(self, operation: Awaitable[T]) -> T | None:
        try:
            return await operation
        except DATABASE_ERRORS as error:
            self.log.warning("database_unavailable", error=str(error).strip())
            return None

    # Claiming.

    async def claim_once(self, limit: int) -> int:
        """Claim up to `limit` due workflows and start a task for each; returns how many.
        The limited types first, each within its limits (engine.flow), then the others
        (claim_due_workflows)."""
        await self._read_limits()
        claimed_at = self.last_claim_at = time.monotonic()
        async with self.store.claiming_transaction() as tx:
            rows = await claim_limited(
                tx, limits=self.limits, worker_id=self.id, served=self.limited_served,
                busy=list(self.driver.busy), room=limit, lease_seconds=self.config.lease_seconds,
                definitions=self.step_definitions,
            ) if self.limits else []  # fmt: skip
            if self.unlimited_served and len(rows) < limit:
                rows += await tx.claim_due_workflows(
                    worker_id=self.id,
                    served=self.unlimited_served,
                    limit=limit - len(rows),
                    lease_seconds=self.config.lease_seconds,
                    busy=list(self.driver.busy),
                    definitions=self.step_definitions,
                )
            assignments = await self._prepare(tx, rows, claimed_at + self.config.lease_seconds)
        self._count_claims(rows)
        for assignment in assignments:
            self._spawn(assignment)
        return len(rows)

    async def _read_limits(self) -> None:
        """The limits of this worker's types, read again every LIMITS_REFRESH_SECONDS,
        their slots and tokens made when a limit is new or changed."""
        if time.monotonic() - self.limits_read_at < LIMITS_REFRESH_SECONDS:
            return
        limits = await self.store.load_limits(self.registry.types)
        changed = {name: each for name, each in limits.items() if self.limits.get(name) != each}
        if slotted := concurrency_limited(changed):
            await self.store.provide_slots(slotted)
        if tokened := rate_limited(changed):
            await self.store.provide_tokens(tokened)
        if limits != self.limits:
            self.limits = limits
            self.limited_served = self.registry.served_keys(limits)
            self.unlimited_served = self.registry.served_keys(set(self.registry.types) - set(limits))
            # Each step start of a rate-limited type spends a token: none goes on unclaimed.
            self.driver.claim_every_step = frozenset(rate_limited(limits))
        self.limits_read_at = time.monotonic()

    def _count_claims(self, rows: list[ClaimedWorkflow]) -> None:
        if not rows:
            return
        self.metrics.claim_batch.observe(len(rows))
        for row in rows:
            self.metrics.pickup_lag.observe(max(0.0, row.pickup_lag_seconds))
            if row.previous_state == "pending":
                self.metrics.workflows_started.labels(row.type).inc()

    async def _prepare(self, tx: Store, rows: list[ClaimedWorkflow], deadline: float) -> list[Assignment]:
        """Turn claimed rows into assignments, inside the claiming transaction.

        Each row is decided on its own (engine.attempts.decide): one that must not run
        (unreadable, invalid, interrupted for good, a cancel at this step boundary) is
        settled here, alone, and the others go on. Workflows claimed for the first time
        get their step rows in one statement.
        """
        assignments = []
        for claimed in rows:
            # The workflow's own version, or for one with none yet the newest served.
            definition = self.registry.get(claimed.type, claimed.version)
            assert definition is not None  # the claim asked only for served versions
            decision = decide(claimed, definition)
            if isinstance(decision, Run):
                assignments.append(self._assignment(claimed, definition, decision, deadline))
            else:
                await self._settle_claim(tx, claimed, definition, decision)
        fresh = [a for a in assignments if a.claimed.first_claim]
        if fresh:
            await tx.create_steps(
                worker_id=self.id,
                digests={a.workflow_id: a.step_digest for a in fresh},
                definitions=self.step_definitions,
            )
        return assignments

    @staticmethod
    def _assignment(claimed: ClaimedWorkflow, definition: Workflow, run: Run, deadline: float) -> Assignment:
        return Assignment(
            claimed=claimed,
            definition=definition,
            input=run.input,
            step_index=claimed.current_step_index,
            attempt=claimed.attempt or 1,
            retry_count=claimed.retry_count or 0,
            lease_deadline=deadline,
            outputs=run.outputs,
            step_digest=run.step_digest,
        )

    async def _settle_claim(
        self, tx: Store, claimed: ClaimedWorkflow, definition: Workflow, decision: CancelAtBoundary | Refuse
    ) -> None:
        """Cancel or refuse one claimed workflow, in a savepoint of the claiming
        transaction: should its own write fail, it alone is given back (due again after
        its lease), and the rest of the claim stands."""
        try:
            async with tx.savepoint():
                if isinstance(decision, Refuse):
                    await self._refuse(tx, claimed, definition, decision)
                else:
                    await self._cancel(tx, claimed, definition)
        except DATABASE_ERRORS:
            raise  # the connection is gone: the claim as a whole rolls back
        except Exception:
            self.log.exception("claim_row_crashed", workflow_id=str(claimed.id), type=claimed.type)
            return
        if self.tracing is not None:
            failed = decision.failure if isinstance(decision, Refuse) else None
            self.tracing.claim_settled(claimed, worker_id=self.id, failed=failed)

    async def _refuse(
        self, tx: Store, claimed: ClaimedWorkflow, definition: Workflow, refusal: Refuse
    ) -> None:
        """Fail a just-claimed workflow that must not run."""
        outcome = refusal.failure
        await tx.fail_workflow(
            FailedAttempt(
                claimed.id, claimed.lease_token, claimed.current_step_index, claimed.attempt,
                outcome.error, outcome.traceback, self.id, compensation=claimed.compensating,
            )
        )  # fmt: skip
        # The definition decides: a row inserted by SQL learns requires_compensation only now.
        # Refused at its first claim, it ran nothing: failed, with nothing to undo.
        if definition.requires_compensation and not claimed.compensating and not claimed.first_claim:
            await tx.begin_compensation(workflow_id=claimed.id, worker_id=self.id)
        else:
            self.metrics.workflows_finished.labels(claimed.type, "failed").inc()
        self.metrics.claim_rejections.labels(refusal.reason).inc()
        self.log.error(
            "workflow_refused", workflow_id=str(claimed.id), type=claimed.type, error=outcome.error["message"]
        )

    async def _cancel(self, tx: Store, claimed: ClaimedWorkflow, definition: Workflow) -> None:
        """Honour a cancel request at this step boundary."""
        await tx.cancel_at_boundary(
            workflow_id=claimed.id, lease_token=claimed.lease_token, worker_id=self.id
        )
        if definition.requires_compensation:
            await tx.begin_compensation(workflow_id=claimed.id, worker_id=self.id)
        else:
            self.metrics.workflows_finished.labels(claimed.type, "cancelled").inc()
        self.log.info("workflow_cancelled", workflow_id=str(claimed.id), type=claimed.type)

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
