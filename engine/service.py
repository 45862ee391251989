"""WorkflowService: the Python API to start and inspect workflows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from engine.counts import ABANDONED_COUNTS_SECONDS, counts_are_abandoned, recount_finished
from engine.definitions import MAX_RETRIES_DEFAULT, Workflow, priority_problem
from engine.errors import (
    OUTCOME_UNKNOWN,
    EventRefusedError,
    IdempotencyKeyConflictError,
    IllegalTransitionError,
    InvalidLimitError,
    InvalidPriorityError,
    InvalidStartTimeError,
    InvalidWorkflowIdError,
    PriorityRefusedError,
    UnservedTypeError,
    UnstorableValueError,
    VersionMismatchError,
    WorkflowNotFoundError,
)
from engine.idempotency import canonical_json, check_storable_text, start_identity
from engine.limits import UNCHANGED, RateLimit, Unchanged, concurrency_problem, rate_limit_problem
from engine.primary import require_primary
from engine.records import (
    ExecutionSummary,
    LimitRecord,
    ScheduleRecord,
    StartResult,
    StepRecord,
    TimelineEvent,
    TypeFlow,
    VersionUsage,
    WorkerInfo,
    WorkflowPage,
    WorkflowRecord,
    WorkflowStats,
)
from engine.registry import Registry
from engine.schedules import Schedule, ScheduleNotFoundError, next_tick
from engine.states import FINISHED_WORKFLOW_STATES, WORKFLOW_TRANSITIONS, WorkflowState
from engine.store import Store
from engine.summary import completed_steps, summarize
from engine.traceparent import current_traceparent

LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
# Deeper pages than this are better served by a narrower filter.
LIST_PAGE_MAX = 100_000
POOL_SIZE_DEFAULT = 4
# A worker unseen for this long is not counted as live (three default leases).
WORKER_STALE_SECONDS_DEFAULT = 90.0
WAIT_POLL_SECONDS_MAX = 0.5
# A caller's own idempotency key: long enough for any order number or UUID, short
# enough for the unique index.
IDEMPOTENCY_KEY_MAX_LENGTH = 512
# What a search (the CLI's and the HTTP API's) may be: as long as the longest key.
SEARCH_QUERY_MAX_LENGTH = IDEMPOTENCY_KEY_MAX_LENGTH


# The longest delay of a start: a century, far inside PostgreSQL's dates (a delay of
# 1e136 seconds would overflow them).
START_DELAY_MAX_SECONDS = 100 * 365.25 * 86_400


def check_start_time(start_at: datetime | None, delay_seconds: float | None) -> None:
    """A delayed start names a moment (with its time zone) or a delay, not both."""
    if start_at is not None and delay_seconds is not None:
        raise InvalidStartTimeError("give a start time or a delay, not both")
    if start_at is not None and start_at.utcoffset() is None:
        raise InvalidStartTimeError(f"start time {start_at.isoformat()} has no time zone (e.g. +00:00)")
    if delay_seconds is not None and not 0 <= delay_seconds <= START_DELAY_MAX_SECONDS:
        raise InvalidStartTimeError(
            f"a delay is 0 to {START_DELAY_MAX_SECONDS:.0f} seconds (a century), not {delay_seconds}"
        )


def check_priority(priority: int | None) -> None:
    """A priority is a whole number from -100 to 100 (or None: the type's)."""
    if priority is not None and (problem := priority_problem(priority)):
        raise InvalidPriorityError(problem)


def check_text(**fields: str | None) -> None:
    """Refuse text PostgreSQL cannot hold, naming the field."""
    for name, value in fields.items():
        if value is not None:
            check_storable_text(value, name)


def check_idempotency_key(key: str | None) -> None:
    """Refuse a caller's key that is empty, too long, or text PostgreSQL cannot hold."""
    if key is None:
        return
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH:
        raise UnstorableValueError(f"an idempotency key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters")
    check_storable_text(key, "the idempotency key")


def check_same_start(
    existing: WorkflowRecord, type: str, input: Mapping[str, Any], user_id: str | None
) -> None:
    """A start that found its key taken must be the start that took it (type, user, input)."""
    theirs = start_identity(existing.type, existing.user_id, existing.input)
    ours = start_identity(type, user_id, input)
    differences = [part for part in ours if ours[part] != theirs[part]]
    if differences:
        raise IdempotencyKeyConflictError(existing.idempotency_key, existing.id, differences)


def parse_workflow_id(workflow_id: UUID | str) -> UUID:
    """A UUID from a UUID or its text; anything else is an `InvalidWorkflowIdError`."""
    if isinstance(workflow_id, UUID):
        return workflow_id
    try:
        return UUID(str(workflow_id))
    except ValueError:
        raise InvalidWorkflowIdError(f"{workflow_id!r} is not a workflow id (a UUID)") from None


def explain_refused_retry(workflow: WorkflowRecord) -> None:
    """Raise the IllegalTransitionError that says why the retry query refused `workflow`."""
    if workflow.state is not WorkflowState.FAILED:
        WORKFLOW_TRANSITIONS.check(workflow.state, WorkflowState.PENDING)
        return
    if (workflow.error or {}).get("type") == OUTCOME_UNKNOWN:
        step = (workflow.error or {}).get("step")
        reason = (
            f"its step {step!r} must not run twice and was interrupted, so it may have taken effect: "
            "check the outside service, then retry with force"
        )
    else:
        reason = "its compensation has begun; re-drive it with compensate instead"
    raise IllegalTransitionError("workflow", "failed", "pending", frozenset(), reason=reason)


class WorkflowService:
    """Start workflows and read their state.

    Starting is idempotent: the same type, user and input (in any key order) map to one
    workflow, also when many callers race; so does a caller's own idempotency key, which
    may not be reused for a different start. A type this process has a definition for is
    validated against its input model at once; an unknown type may still be started,
    because another daemon may serve it.
    """

    def __init__(self, store: Store, registry: Registry | None = None, *, reads: Store | None = None) -> None:
        self.store = store
        self.registry = registry or Registry()
        # Where lists, search and stats read: a replica may lag a little, which they
        # tolerate; a workflow read by id, and every command, use `store`.
        self.reads = reads or store

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, conninfo: str, registry: Registry | None = None, *, pool_size: int = POOL_SIZE_DEFAULT
    ) -> AsyncIterator[WorkflowService]:
        """A service on its own connection pool, closed when the block ends."""
        pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            configure=require_primary,
            reset=require_primary,
        )
        await pool.open(wait=True)
        try:
            yield cls(Store(pool), registry)
        finally:
            await pool.close()

    async def start(
        self,
        type: str,
        input: Mapping[str, Any],
        user_id: str | None,
        wallet_address: str | None = None,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        require_served: bool = False,
        start_at: datetime | None = None,
        delay_seconds: float | None = None,
    ) -> StartResult:
        """Start a workflow, or find the one this start duplicates.

        `idempotency_key`: the caller's own key instead of the computed one. A second
        start with it finds the first workflow if type, user and input are the same, and
        raises `IdempotencyKeyConflictError` if not. `require_served`: raise
        `UnservedTypeError` for a type that neither this registry defines nor a live
        worker serves (the CLI and the HTTP API ask for it; a worker may come later, so
        the Python API, like SQL, does not by default). `start_at` (with a time zone) or
        `delay_seconds` (from the database's clock): no daemon claims it before then; a
        duplicate start finds the first workflow, with the time that one was given.
        `priority` (-100 to 100, smaller first): by default the definition's, or, for a
        type this side does not define, the one its daemons declared (else 0). Started
        while an OpenTelemetry span is current, the workflow stores that span's trace
        context, and its runs and steps, on any daemon, continue the trace (a duplicate
        start keeps the first start's).
        """
        check_text(type=type, user_id=user_id, wallet_address=wallet_address)
        check_idempotency_key(idempotency_key)
        check_start_time(start_at, delay_seconds)
        check_priority(priority)
        definition = await self._startable(type, input, require_served=require_served)
        row = await self.store.insert_workflow(
            type=type,
            # The newest version this side knows; an unknown type gets it at its first claim.
            version=definition.version if definition else None,
            input=input,
            user_id=user_id,
            wallet_address=wallet_address,
            total_steps=len(definition.steps) if definition else 0,
            max_retries=definition.max_retries if definition else MAX_RETRIES_DEFAULT,
            requires_compensation=definition.requires_compensation if definition else False,
            # None: the insert trigger gives the type's declared priority.
            priority=priority if priority is not None or definition is None else definition.priority,
            idempotency_key=idempotency_key,
            start_at=start_at,
            delay_seconds=delay_seconds,
            traceparent=current_traceparent(),
        )
        if row is not None:
            return StartResult(workflow=WorkflowRecord.model_validate(row), created=True)
        # The key exists. Its row is committed: ON CONFLICT waited for the other insert,
        # and this new statement reads a new snapshot.
        existing = await self.store.get_workflow_by_start(
            type=type, input=input, user_id=user_id, idempotency_key=idempotency_key
        )
        if existing is None:  # deleted in between: rare, and a retry settles it
            return await self.start(
                type, input, user_id, wallet_address, priority=priority, idempotency_key=idempotency_key,
                require_served=require_served, start_at=start_at, delay_seconds=delay_seconds,
            )  # fmt: skip
        workflow = WorkflowRecord.model_validate(existing)
        check_same_start(workflow, type, input, user_id)
        return StartResult(workflow=workflow, created=False)

    async def start_workflow(
        self,
        type: str,
        input: Mapping[str, Any],
        user_id: str | None,
        wallet_address: str | None = None,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        start_at: datetime | None = None,
    ) -> WorkflowRecord:
        """Start a workflow (at `start_at`, if given) and return it; a duplicate start
        returns the existing one."""
        result = await self.start(
            type, input, user_id, wallet_address, priority=priority, idempotency_key=idempotency_key,
            start_at=start_at,
        )  # fmt: skip
        return result.workflow

    async def get_workflow(self, workflow_id: UUID | str) -> WorkflowRecord:
        """One workflow; `WorkflowNotFoundError` if there is none with this id."""
        return await self._workflow(self.store, parse_workflow_id(workflow_id))

    @staticmethod
    async def _workflow(store: Store, key: UUID) -> WorkflowRecord:
        """One workflow as `store` sees it. An operator command reads it back in its own
        transaction: the record is what the command left, not what a daemon made of it
        the moment the command committed (a retried workflow comes back pending, not
        already claimed)."""
        row = await store.get_workflow(key)
        if row is None:
            raise WorkflowNotFoundError(key)
        return WorkflowRecord.model_validate(row)

    async def get_steps(self, workflow_id: UUID | str) -> list[StepRecord]:
        """The steps of a workflow, in order (none before its first claim)."""
        workflow = await self.get_workflow(workflow_id)
        return [StepRecord.model_validate(row) for row in await self.store.get_steps(workflow.id)]

    async def list_workflows(
        self,
        page: int = 1,
        limit: int = LIST_LIMIT_DEFAULT,
        state: WorkflowState | str | None = None,
        type: str | None = None,
        user_id: str | None = None,
    ) -> WorkflowPage:
        """Workflows newest first, a page at a time; `limit` is capped at LIST_LIMIT_MAX."""
        if not 1 <= page <= LIST_PAGE_MAX or limit < 1:
            raise UnstorableValueError(f"page must be in 1..{LIST_PAGE_MAX} and limit at least 1")
        limit = min(limit, LIST_LIMIT_MAX)
        check_text(type=type, user_id=user_id)
        state_name = WorkflowState(state).value if state is not None else None
        filters = {"state": state_name, "type": type, "user_id": user_id}
        rows = await self.reads.list_workflows(**filters, limit=limit, offset=(page - 1) * limit)
        total = await self.reads.count_workflows(**filters)
        items = [WorkflowRecord.model_validate(row) for row in rows]
        return WorkflowPage(items=items, page=page, limit=limit, total=total)

    async def get_execution_summary(self, workflow_id: UUID | str) -> ExecutionSummary:
        """Progress, current step, durations, retries and last error of a workflow."""
        workflow = await self.get_workflow(workflow_id)
        steps = [StepRecord.model_validate(row) for row in await self.store.get_steps(workflow.id)]
        return summarize(workflow, steps, self.registry.get(workflow.type, workflow.version))

    async def count_completed_steps(self, workflows: Sequence[WorkflowRecord]) -> dict[UUID, int]:
        """The completed steps of each workflow (as its execution summary counts them), for
        views of many workflows."""
        steps: dict[UUID, list[StepRecord]] = {workflow.id: [] for workflow in workflows}
        for row in await self.reads.get_steps_of([workflow.id for workflow in workflows]):
            steps[row["workflow_id"]].append(StepRecord.model_validate(row))
        return {workflow.id: completed_steps(workflow, steps[workflow.id]) for workflow in workflows}

    async def get_timeline(self, workflow_id: UUID | str) -> list[TimelineEvent]:
        """Every transition of the workflow and its steps, oldest first (who, when, attempt, error)."""
        workflow = await self.get_workflow(workflow_id)
        return [TimelineEvent.model_validate(row) for row in await self.store.get_timeline(workflow.id)]

    async def cancel_workflow(self, workflow_id: UUID | str, *, actor: str | None = None) -> WorkflowRecord:
        """Cancel a workflow: a pending one at once, a running one at its next step boundary.

        A running workflow gets `cancel_requested` (its running step sees it in
        `ctx.cancel_requested`) and then compensates if its definition requires it.
        Cancelling a finished workflow raises IllegalTransitionError. `actor` (who asks)
        is recorded in the timeline events of the transition.
        """
        key = parse_workflow_id(workflow_id)
        async with self.store.transaction() as tx:
            changed = await tx.cancel_workflow(key, actor=actor)
            if changed is not None and changed["compensate"]:
                await tx.begin_compensation(workflow_id=key, worker_id=None, actor=actor)
            if changed is not None:
                await tx.notify_due()
            workflow = await self._workflow(tx, key)
        if changed is None:
            WORKFLOW_TRANSITIONS.check(workflow.state, WorkflowState.CANCELLED)
        return workflow

    async def retry_workflow(
        self, workflow_id: UUID | str, *, force: bool = False, actor: str | None = None
    ) -> WorkflowRecord:
        """Resume a failed workflow at its failed step; completed steps do not run again.

        A workflow that failed with an unknown outcome (a step that must not run twice
        was interrupted, and may have taken effect) is retried only with `force`, once
        the operator has checked the outside service. `actor` (who asks) is recorded in
        the timeline events of the transition.
        """
        key = parse_workflow_id(workflow_id)
        async with self.store.transaction() as tx:
            retried = await tx.retry_workflow(key, force=force, needs_force=OUTCOME_UNKNOWN, actor=actor)
            if retried:
                await tx.notify_due()
            workflow = await self._workflow(tx, key)
        if not retried:
            explain_refused_retry(workflow)
        return workflow

    async def set_priority(self, workflow_id: UUID | str, priority: int) -> WorkflowRecord:
        """Change the priority of a workflow still to run (pending, running or
        compensating): its next claim goes by it. `PriorityRefusedError` for a finished
        one, which no daemon will claim again."""
        key = parse_workflow_id(workflow_id)
        check_priority(priority)
        changed = await self.store.set_priority(key, priority)
        if changed is not None:
            return WorkflowRecord.model_validate(changed)
        workflow = await self.get_workflow(key)
        raise PriorityRefusedError(
            f"workflow {key} is {workflow.state}: only one still to run has a priority to change"
        )

    async def compensate_workflow(
        self, workflow_id: UUID | str, *, actor: str | None = None
    ) -> WorkflowRecord:
        """Undo the completed steps of a failed or cancelled workflow, in reverse order.

        Works whether or not the definition compensates by itself, and re-drives a
        compensation that gave up (its stuck step gets a fresh retry budget). `actor`
        (who asks) is recorded in the timeline events of the transition.
        """
        key = parse_workflow_id(workflow_id)
        async with self.store.transaction() as tx:
            locked = await tx.lock_for_compensation(key)
            if locked:
                await tx.begin_compensation(workflow_id=key, worker_id=None, actor=actor)
                await tx.notify_due()
            workflow = await self._workflow(tx, key)
        if not locked:
            WORKFLOW_TRANSITIONS.check(workflow.state, WorkflowState.COMPENSATING)
        return workflow

    async def _startable(
        self, workflow_type: str, input: Mapping[str, Any], *, require_served: bool
    ) -> Workflow | None:
        """The definition a start of `workflow_type` with `input` runs, its input checked
        (a start's, a schedule's); None for a type defined elsewhere, which with
        `require_served` a live worker must serve."""
        canonical_json(input)  # refuses what is not JSON before it reaches the database
        definition = self.registry.get(workflow_type)
        if definition is not None:
            definition.validate_input(input)
        elif require_served:
            await self._check_served(workflow_type)
        return definition

    async def _check_served(self, workflow_type: str) -> None:
        """Raise UnservedTypeError unless a live worker serves `workflow_type`."""
        workers = await self.reads.live_workers(stale_seconds=WORKER_STALE_SECONDS_DEFAULT)
        served = {name for worker in workers for name in worker["types"]}
        if workflow_type not in served:
            raise UnservedTypeError(workflow_type, sorted(served | set(self.registry.types)))

    async def get_stats(self, *, worker_stale_seconds: float = WORKER_STALE_SECONDS_DEFAULT) -> WorkflowStats:
        """Counts by state and type (engine/counts.py), recent outcomes, the oldest due
        work, live workers, the types with due work that no live worker serves, and the
        workflows no daemon will claim as they stand (stuck: a row edited by hand)."""
        if await counts_are_abandoned(self.reads):
            await recount_finished(self.store, older_than=ABANDONED_COUNTS_SECONDS)
        by_state: dict[str, int] = {}
        by_type: dict[str, dict[str, int]] = {}
        for row in await self.reads.count_all_by_type_and_state():
            by_state[row["state"]] = by_state.get(row["state"], 0) + row["count"]
            by_type.setdefault(row["type"], {})[row["state"]] = row["count"]
        recent = await self.reads.recent_outcomes()
        workers = await self.reads.live_workers(stale_seconds=worker_stale_seconds)
        return WorkflowStats(
            by_state=by_state,
            by_type=by_type,
            completed_last_minute=recent["completed_last_minute"],
            failed_last_minute=recent["failed_last_minute"],
            completed_last_hour=recent["completed_last_hour"],
            failed_last_hour=recent["failed_last_hour"],
            oldest_due_age_seconds=recent["oldest_due_age_seconds"],
            live_workers=[WorkerInfo.model_validate(row) for row in workers],
            unserved_types=list(await self.reads.unserved_work(stale_seconds=worker_stale_seconds)),
            stuck_workflows=await self.reads.count_stuck_workflows(),
            flow=[TypeFlow.of(row) for row in await self.reads.type_flow()],
        )

    async def send_event(
        self, workflow_id: UUID | str, name: str, payload: Any = None, *, event_id: str | None = None
    ) -> bool:
        """Send the event `name` to a workflow, for a step that waits for it (now or when
        the workflow gets there); its payload becomes that step's output. True when it
        is new, False for a duplicate (the same `event_id`; by default the same name and
        payload). `WorkflowNotFoundError` for no such workflow, `EventRefusedError` for a
        finished one."""
        key = parse_workflow_id(workflow_id)
        check_text(name=name, event_id=event_id)
        if not name:
            raise EventRefusedError("an event needs a name")
        canonical_json(payload)
        try:
            return await self.store.send_event(workflow_id=key, name=name, payload=payload, event_id=event_id)
        except psycopg.errors.NoDataFound:
            raise WorkflowNotFoundError(key) from None
        except psycopg.errors.ObjectNotInPrerequisiteState as error:
            raise EventRefusedError(error.diag.message_primary or str(error)) from None

    # Concurrency and rate limits (sql/queries/limits.sql).

    async def list_limits(self) -> list[LimitRecord]:
        """Every type with a limit declared or set, with its use now."""
        return [LimitRecord.of(row) for row in await self.reads.list_limits()]

    async def set_limit(
        self,
        type: str,
        max_concurrency: int | Unchanged | None = UNCHANGED,
        *,
        rate_limit: str | Unchanged | None = UNCHANGED,
        actor: str | None = None,
    ) -> LimitRecord:
        """Set a type's concurrency limit, its rate limit ("10/s") or both at run time,
        over its definition's (None: no limit; one left UNCHANGED holds as it did); the
        daemons hold to them from their next read of the limits (2 s)."""
        check_text(type=type, actor=actor)
        if max_concurrency is UNCHANGED and rate_limit is UNCHANGED:
            raise InvalidLimitError("name a concurrency limit, a rate limit or both")
        if max_concurrency is not UNCHANGED and (problem := concurrency_problem(max_concurrency)):
            raise InvalidLimitError(problem)
        if rate_limit is not UNCHANGED and (problem := rate_limit_problem(rate_limit)):
            raise InvalidLimitError(problem)
        rate = RateLimit.parse(rate_limit) if isinstance(rate_limit, str) else rate_limit
        await self.store.set_limit(type=type, max_concurrency=max_concurrency, rate=rate, set_by=actor)
        (limit,) = await self.store.list_limits(type)
        return LimitRecord.of(limit)

    async def reset_limit(self, type: str) -> LimitRecord | None:
        """Back to the definition's limits; None when the type has none either."""
        check_text(type=type)
        await self.store.reset_limit(type)
        found = await self.store.list_limits(type)
        return LimitRecord.of(found[0]) if found else None

    # Cron schedules (engine/schedules.py).

    async def add_schedule(self, schedule: Schedule, *, require_served: bool = False) -> ScheduleRecord:
        """Add a schedule, or change the one of that name (its next tick stays unless its
        cron expression or time zone changed). Its input is checked as a start's is."""
        return await self._put_schedule(schedule, declared=False, require_served=require_served)

    async def declare_schedule(self, schedule: Schedule) -> ScheduleRecord:
        """A schedule declared in code, upserted (a daemon's start)."""
        return await self._put_schedule(schedule, declared=True)

    async def _put_schedule(
        self, schedule: Schedule, *, declared: bool, require_served: bool = False
    ) -> ScheduleRecord:
        check_text(type=schedule.type, user_id=schedule.user_id)
        await self._startable(schedule.type, schedule.input, require_served=require_served)
        first = next_tick(schedule.cron, schedule.timezone, await self.store.database_now())
        row = await self.store.put_schedule(
            {**asdict(schedule), "input": dict(schedule.input), "declared": declared, "next_fire_at": first}
        )
        return ScheduleRecord.model_validate(row)

    async def list_schedules(self) -> list[ScheduleRecord]:
        return [ScheduleRecord.model_validate(row) for row in await self.reads.list_schedules()]

    async def pause_schedule(self, name: str) -> ScheduleRecord:
        """Fire no more ticks until resumed."""
        return await self._enable(name, enabled=False, next_fire_at=None)

    async def resume_schedule(self, name: str) -> ScheduleRecord:
        """Fire again, from the next tick after now (not the ticks missed while paused)."""
        found = await self.store.get_schedule(name)
        if found is None:
            raise ScheduleNotFoundError(name)
        first = next_tick(found["cron"], found["timezone"], await self.store.database_now())
        return await self._enable(name, enabled=True, next_fire_at=first)

    async def _enable(self, name: str, *, enabled: bool, next_fire_at: datetime | None) -> ScheduleRecord:
        row = await self.store.set_schedule_enabled(name, enabled=enabled, next_fire_at=next_fire_at)
        if row is None:
            raise ScheduleNotFoundError(name)
        return ScheduleRecord.model_validate(row)

    async def remove_schedule(self, name: str) -> None:
        if not await self.store.remove_schedule(name):
            raise ScheduleNotFoundError(name)

    async def migrate_version(self, workflow_type: str, from_version: int, to_version: int) -> list[UUID]:
        """Move the workflows of `workflow_type` still to run from one version of its
        definition to another; returns their ids.

        Refused (`VersionMismatchError`) unless this process knows both versions and their
        steps line up, the same names in the same order: each workflow then goes on at the
        step it is at. A version whose steps changed is drained instead.
        """
        if from_version == to_version:
            raise VersionMismatchError(f"from and to are both version {from_version}: nothing would move")
        source, target = (
            self.registry.get(workflow_type, from_version),
            self.registry.get(workflow_type, to_version),
        )
        if source is None or target is None:
            missing = from_version if source is None else to_version
            raise VersionMismatchError(
                f"no version {missing} of {workflow_type!r} is defined here (WORKFLOWD_MODULES)"
            )
        before, after = [step.name for step in source.steps], [step.name for step in target.steps]
        if before != after:
            raise VersionMismatchError(
                f"version {from_version} of {workflow_type!r} has steps {before}, version {to_version} "
                f"has {after}: its workflows in flight cannot move; let them finish under version "
                f"{from_version}"
            )
        return await self.store.migrate_version(
            type=workflow_type, from_version=from_version, to_version=to_version
        )

    async def get_versions(
        self, *, worker_stale_seconds: float = WORKER_STALE_SECONDS_DEFAULT
    ) -> list[VersionUsage]:
        """Every type's definition versions with their workflows in flight and finished, and
        the live workers serving each: when an old version has none in flight, its code can go."""
        rows = await self.reads.definition_versions(stale_seconds=worker_stale_seconds)
        return [VersionUsage.model_validate(row) for row in rows]

    async def search_workflows(self, q: str, limit: int = LIST_LIMIT_DEFAULT) -> list[WorkflowRecord]:
        """Workflows whose id, idempotency key, type, user id or wallet address equals `q`."""
        q = q.strip()
        try:
            check_text(q=q)
        except UnstorableValueError:
            return []  # nothing stored can hold such text
        if not q:
            return []
        try:
            as_id: UUID | None = UUID(q)
        except ValueError:
            as_id = None
        rows = await self.reads.search_workflows(q=q, id=as_id, limit=min(max(limit, 1), LIST_LIMIT_MAX))
        return [WorkflowRecord.model_validate(row) for row in rows]

    async def wait_for(self, workflow_id: UUID | str, timeout: float | None = None) -> WorkflowRecord:  # noqa: ASYNC109
        """Wait until the workflow is finished (completed, failed, cancelled or compensated)
        and return it; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            workflow = await self.get_workflow(workflow_id)
            if workflow.state in FINISHED_WORKFLOW_STATES:
                return workflow
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"workflow {workflow.id} is still {workflow.state} after {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, WAIT_POLL_SECONDS_MAX)
