"""The SQL access layer: one method per named query of sql/queries/*.sql.

A `Store` is built from a connection pool, or bound to one connection; `transaction()`
yields a store bound to an open transaction with the same methods, so the same code
runs inside or outside a transaction (and a transactional step's writes can share the
transaction that records its completion).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from engine.attempts import ClaimedWorkflow
from engine.definitions import Workflow
from engine.idempotency import json_text
from engine.limits import UNCHANGED, RateLimit, TypeLimits, Unchanged
from engine.sqlfiles import query

Row = dict[str, Any]
T = TypeVar("T")


def stored_json(value: Any) -> Jsonb:
    """A JSON value as the tables store it: through json_text, the one encoder, so that a
    Decimal keeps every digit and what jsonb cannot hold is refused in one line."""
    return Jsonb(value, dumps=json_text)


@dataclass(frozen=True)
class FailedAttempt:
    """A failed attempt of a step (or of its compensation), as the failure queries record it.

    `attempt` is None for a workflow refused before any attempt (invalid input).
    """

    workflow_id: UUID
    lease_token: UUID
    step_index: int
    attempt: int | None
    error: Mapping[str, Any]
    traceback: str
    worker_id: str
    compensation: bool = False

    def params(self) -> dict[str, Any]:
        """The named parameters the failure queries share."""
        return {
            "id": self.workflow_id,
            "lease_token": self.lease_token,
            "step_index": self.step_index,
            "attempt": self.attempt,
            "error": Jsonb(dict(self.error)),
            "traceback": self.traceback,
            "worker_id": self.worker_id,
        }


@dataclass(frozen=True)
class Completion:
    """A succeeded attempt of a forward step, as complete_steps records it.

    `output_json`: the output's JSON text (engine.idempotency.json_text). `go_on`: start
    the next step under the same lease rather than release the workflow.
    `workflow_output_json`: the workflow's final output when this is its last step and
    its definition shapes it; None leaves the step's output to be the workflow's.
    """

    workflow_id: UUID
    lease_token: UUID
    step_index: int
    attempt: int
    output_json: str
    go_on: bool
    workflow_output_json: str | None = None


@dataclass(frozen=True, slots=True)
class Advanced:
    """Where a recorded completion (of a step or of its compensation) left the workflow.

    `next_step_index` is the step it went straight on to under the same lease (None:
    the lease was released, or nothing is left); `next_attempt` and `next_retry_count`
    count that step's attempts (its compensation's, when compensating).
    """

    id: UUID
    was_last: bool
    next_step_index: int | None
    next_attempt: int | None
    next_retry_count: int | None


@dataclass(frozen=True, slots=True)
class StepAttempts:
    """A step's state and attempt counters (forward and compensating)."""

    state: str
    attempt: int
    compensation_attempt: int


@dataclass(frozen=True, slots=True)
class StepProgress:
    """Where a workflow stands: its lease, its cursor, and the state and attempt counters
    of the step under the cursor (its compensation's while compensating)."""

    workflow_state: str
    lease_token: UUID | None
    current_step_index: int
    step_state: str | None
    attempt: int | None
    retry_count: int | None


@dataclass(frozen=True, slots=True)
class Renewal:
    """A lease the heartbeat found still ours: renewed, or skipped because the row was
    locked at that moment (renewed at the next beat)."""

    id: UUID
    cancel_requested: bool
    renewed: bool


@dataclass(frozen=True)
class StepDefinitions:
    """Workflow definitions as the queries take them, built once per worker: `steps`
    for create_steps (an element per step of each type and version), `shapes` for the
    claim (an element per type and version: its shape)."""

    steps: dict[str, list[Any]]
    shapes: dict[str, list[Any]]

    @classmethod
    def of(cls, workflows: Iterable[Workflow]) -> StepDefinitions:
        types = list(workflows)
        steps = [(workflow, index, step) for workflow in types for index, step in enumerate(workflow.steps)]
        return cls(
            steps={
                "types": [workflow.type for workflow, _, _ in steps],
                "type_versions": [workflow.version for workflow, _, _ in steps],
                "step_indexes": [index for _, index, _ in steps],
                "step_names": [step.name for _, _, step in steps],
                "max_retries": [step.retries(workflow.max_retries) for workflow, _, step in steps],
                "idempotent": [step.is_idempotent for _, _, step in steps],
                "compensable": [step.compensate is not None for _, _, step in steps],
                "configs": [Jsonb(dict(step.config)) for _, _, step in steps],
            },
            shapes={
                "shape_types": [workflow.type for workflow in types],
                "shape_versions": [workflow.version for workflow in types],
                "shape_totals": [len(workflow.steps) for workflow in types],
                "shape_max_retries": [workflow.max_retries for workflow in types],
                "shape_compensation": [workflow.requires_compensation for workflow in types],
            },
        )


class Store:
    """Named queries over a pool or over one (possibly transaction-bound) connection."""

    def __init__(self, source: AsyncConnectionPool | AsyncConnection[Any]) -> None:
        self._source = source

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection: the bound one, or one borrowed from the pool for the block."""
        if isinstance(self._source, AsyncConnection):
            yield self._source
        else:
            async with self._source.connection() as conn:
                yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Store]:
        """A store whose every query runs in one transaction, committed at the end."""
        async with self.connection() as conn, conn.transaction():
            yield Store(conn)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Inside a transaction of a bound store: a block whose writes roll back alone
        when it raises, leaving the transaction usable."""
        async with self.connection() as conn, conn.transaction():
            yield

    @asynccontextmanager
    async def claiming_transaction(self) -> AsyncIterator[Store]:
        """A transaction for claim_due_workflows: like `transaction()`, but BEGIN also
        pins the claim's plan, in one round trip (see the query of that name)."""
        async with self.connection() as conn:
            await conn.execute(query("claiming_transaction"))
            try:
                yield Store(conn)
            except BaseException:
                # A broken connection has nothing to roll back; the pool discards it.
                with contextlib.suppress(psycopg.OperationalError):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def pin_hot_plans(self) -> None:
        """The worker's session plans its statements as index lookups only (see the query)."""
        async with self.connection() as conn:
            await conn.execute(query("pin_hot_plans"))

    async def unpin_hot_plans(self) -> None:
        """In a transaction: plan as the database is configured until pinned again."""
        async with self.connection() as conn:
            await conn.execute(query("unpin_hot_plans"))

    async def _one(self, name: str, params: Mapping[str, Any]) -> Row | None:
        async with self.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(query(name), params)
            return await cursor.fetchone()

    async def _execute(self, name: str, params: Mapping[str, Any]) -> int:
        """A statement that returns no rows; how many it changed."""
        async with self.connection() as conn, conn.cursor() as cursor:
            await cursor.execute(query(name), params)
            return cursor.rowcount

    async def _all(self, name: str, params: Mapping[str, Any]) -> list[Row]:
        async with self.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(query(name), params)
            return await cursor.fetchall()

    async def _typed(self, cls: type[T], name: str, params: Mapping[str, Any]) -> list[T]:
        async with self.connection() as conn, conn.cursor(row_factory=class_row(cls)) as cursor:
            await cursor.execute(query(name), params)
            return await cursor.fetchall()

    async def _scalar(self, name: str, params: Mapping[str, Any]) -> Any:
        async with self.connection() as conn, conn.cursor() as cursor:
            await cursor.execute(query(name), params)
            row = await cursor.fetchone()
            return row[0] if row else None

    async def insert_workflow(
        self,
        *,
        type: str,
        version: int | None,
        input: Any,
        user_id: str | None,
        wallet_address: str | None,
        total_steps: int,
        max_retries: int,
        requires_compensation: bool,
        priority: int | None,
        idempotency_key: str | None = None,
        start_at: datetime | None = None,
        delay_seconds: float | None = None,
        traceparent: str | None = None,
    ) -> Row | None:
        """Insert a pending workflow; None when its idempotency key already exists.

        `idempotency_key`: the caller's own key; None lets the insert trigger compute it,
        as `priority` None lets it give the type's declared priority. `start_at` or
        `delay_seconds`: when it falls due (default: now). `traceparent`: the starter's
        W3C trace context, which its runs continue (engine/traceparent.py).
        """
        return await self._one(
            "insert_workflow",
            {
                "type": type,
                "version": version,
                "input": stored_json(input),
                "user_id": user_id,
                "wallet_address": wallet_address,
                "total_steps": total_steps,
                "max_retries": max_retries,
                "requires_compensation": requires_compensation,
                "priority": priority,
                "idempotency_key": idempotency_key,
                "start_at": start_at,
                "delay_seconds": delay_seconds,
                "traceparent": traceparent,
            },
        )

    async def set_priority(self, workflow_id: UUID, priority: int) -> Row | None:
        """The workflow with its new priority; None when it is not one still to run."""
        return await self._one("set_priority", {"id": workflow_id, "priority": priority})

    async def migrate_version(self, *, type: str, from_version: int, to_version: int) -> list[UUID]:
        """Move a type's workflows still to run to another version; their ids."""
        params = {"type": type, "from_version": from_version, "to_version": to_version}
        return [row["id"] for row in await self._all("migrate_version", params)]

    async def get_workflow_by_start(
        self, *, type: str, input: Any, user_id: str | None, idempotency_key: str | None = None
    ) -> Row | None:
        """The workflow that a start with these arguments (or with this key) maps to, if any."""
        params = {
            "type": type,
            "input": stored_json(input),
            "user_id": user_id,
            "idempotency_key": idempotency_key,
        }
        return await self._one("get_workflow_by_start", params)

    async def get_workflow(self, workflow_id: UUID) -> Row | None:
        """One workflow row by id."""
        return await self._one("get_workflow", {"id": workflow_id})

    async def get_steps(self, workflow_id: UUID) -> list[Row]:
        """The step rows of a workflow, in order (none before its first claim)."""
        return await self._all("get_steps", {"id": workflow_id})

    async def get_steps_of(self, workflow_ids: Sequence[UUID]) -> list[Row]:
        """The step rows of several workflows, by workflow, in order."""
        return await self._all("get_steps_of", {"ids": list(workflow_ids)})

    # External events.

    async def lock_for_wait(
        self, *, workflow_id: UUID, lease_token: UUID, step_index: int, wait_seconds: float | None
    ) -> Row | None:
        """In the waiting transaction: lock the leased workflow (None: the lease is gone)."""
        params = {
            "id": workflow_id,
            "lease_token": lease_token,
            "step_index": step_index,
            "timeout": wait_seconds,
        }
        return await self._one("lock_for_wait", params)

    async def take_event(self, *, workflow_id: UUID, step_index: int, name: str) -> str | None:
        """Consume the oldest unconsumed event `name` of the workflow; its payload's JSON."""
        row = await self._one("take_event", {"id": workflow_id, "step_index": step_index, "name": name})
        return None if row is None else str(row["payload_text"])

    async def send_event(self, *, workflow_id: UUID, name: str, payload: Any, event_id: str | None) -> bool:
        """workflow_send_event: True when the event is new."""
        params = {"id": workflow_id, "name": name, "payload": stored_json(payload), "event_id": event_id}
        return bool(await self._scalar("send_event", params))

    # Schedules.

    async def database_now(self) -> datetime:
        """The database's clock, which decides when schedules fire."""
        value: datetime = await self._scalar("database_now", {})
        return value

    async def due_schedules(self, *, limit: int) -> list[Row]:
        """In a transaction: the schedules due now, locked (see the query)."""
        return await self._all("due_schedules", {"limit": limit})

    async def schedule_fired(
        self, *, name: str, next_fire_at: datetime, fired_at: datetime | None, workflow_id: UUID | None,
        worker_id: str,
    ) -> None:  # fmt: skip
        params = {"name": name, "next_fire_at": next_fire_at, "fired_at": fired_at,
                  "workflow_id": workflow_id, "worker_id": worker_id}  # fmt: skip
        await self._execute("schedule_fired", params)

    async def put_schedule(self, params: Mapping[str, Any]) -> Row:
        row = await self._one("put_schedule", {**params, "input": stored_json(params["input"])})
        assert row is not None  # an upsert returns its row
        return row

    async def list_schedules(self) -> list[Row]:
        return await self._all("list_schedules", {})

    async def get_schedule(self, name: str) -> Row | None:
        return await self._one("get_schedule", {"name": name})

    async def set_schedule_enabled(
        self, name: str, *, enabled: bool, next_fire_at: datetime | None
    ) -> Row | None:
        params = {"name": name, "enabled": enabled, "next_fire_at": next_fire_at}
        return await self._one("set_schedule_enabled", params)

    async def remove_schedule(self, name: str) -> bool:
        return await self._one("remove_schedule", {"name": name}) is not None

    async def try_retention_lock(self, lock_id: int) -> bool:
        """In a transaction: whether this one may prune now (no other process does)."""
        return bool(await self._scalar("try_retention_lock", {"lock_id": lock_id}))

    async def prune_workflows(self, *, state: str, age_seconds: float, batch: int) -> int:
        """Delete one batch of finished workflows in `state` (see the query); how many."""
        params = {"state": state, "age_seconds": age_seconds, "batch": batch}
        return await self._execute("prune_workflows", params)

    async def count_prunable(self, *, states: Sequence[str], age_seconds: float) -> dict[str, int]:
        rows = await self._all("count_prunable", {"states": list(states), "age_seconds": age_seconds})
        return {row["state"]: row["count"] for row in rows}

    async def prune_workers(self, *, age_seconds: float) -> int:
        return await self._execute("prune_workers", {"age_seconds": age_seconds})

    async def list_workflows(
        self,
        *,
        state: str | None,
        type: str | None,
        user_id: str | None,
        limit: int,
        offset: int,
    ) -> list[Row]:
        """A page of workflows, newest first."""
        params = {
            "state": state,
            "type": type,
            "user_id": user_id,
            "limit": limit,
            "offset": offset,
        }
        return await self._all("list_workflows", params)

    async def count_workflows(self, *, state: str | None, type: str | None, user_id: str | None) -> int:
        """How many workflows match the listing's filters."""
        count = await self._scalar("count_workflows", {"state": state, "type": type, "user_id": user_id})
        return int(count)

    # Commands of operators: cancel, retry, compensate.

    async def cancel_workflow(self, workflow_id: UUID, *, actor: str | None) -> Row | None:
        """Cancel a pending workflow or flag a running one; None in any other state."""
        return await self._one("cancel_workflow", {"id": workflow_id, "actor": actor})

    async def retry_workflow(
        self, workflow_id: UUID, *, force: bool, needs_force: str, actor: str | None
    ) -> bool:
        """Resume a failed workflow at its failed step; False when it may not be retried.

        A workflow whose error type is `needs_force` is retried only with `force`.
        """
        params = {"id": workflow_id, "force": force, "needs_force": needs_force, "actor": actor}
        return await self._one("retry_workflow", params) is not None

    async def lock_for_compensation(self, workflow_id: UUID) -> bool:
        """Lock a failed or cancelled workflow for the compensate command; False otherwise."""
        return await self._one("lock_for_compensation", {"id": workflow_id}) is not None

    async def notify_due(self) -> None:
        """Wake the daemons: something is due now."""
        await self._one("notify_due", {})

    # Reads for operators.

    async def get_timeline(self, workflow_id: UUID) -> list[Row]:
        """Every recorded transition of a workflow and its steps, in order."""
        return await self._all("get_timeline", {"id": workflow_id})

    async def count_by_type_and_state(self, ids: list[UUID]) -> list[Row]:
        """How many of the workflows of `ids` each type has in each state."""
        return await self._all("count_by_type_and_state", {"ids": ids})

    async def count_all_by_type_and_state(self) -> list[Row]:
        """How many workflows each type has in each state (see the query: the finished
        ones from the last recount, engine/counts.py), read through indexes only."""
        async with self.transaction() as tx:
            await tx.pin_counting_plans()
            return await tx._all("count_all_by_type_and_state", {})

    async def pin_counting_plans(self) -> None:
        """In a transaction: the count of stats plans through indexes (see the query)."""
        await self._execute("pin_counting_plans", {})

    async def try_counts_lock(self, lock_id: int) -> bool:
        """In a transaction: whether this one may recount now (no other process does)."""
        return bool(await self._scalar("try_counts_lock", {"lock_id": lock_id}))

    async def counts_age(self) -> float | None:
        """Seconds since the last recount of finished workflows; None before the first."""
        age: float | None = await self._scalar("counts_age", {})
        return age

    async def recount_finished(self, *, margin_seconds: float) -> None:
        await self._execute("recount_finished", {"margin_seconds": margin_seconds})

    async def recent_outcomes(self) -> Row:
        """Completions and failures of the last minute and hour; age of the oldest due workflow."""
        row = await self._one("recent_outcomes", {})
        assert row is not None  # an aggregate always returns its row
        return row

    async def type_flow(self) -> list[Row]:
        """Each type with runnable work or a limit: in flight against its limits, due,
        throttled and the age of its oldest due workflow (see the query)."""
        return await self._all("type_flow", {})

    async def count_stuck_workflows(self) -> int:
        """Running or compensating workflows no daemon will claim as they stand."""
        return int(await self._scalar("count_stuck_workflows", {}))

    async def live_workers(self, *, stale_seconds: float) -> list[Row]:
        """Workers that have not stopped and were seen within `stale_seconds`."""
        return await self._all("live_workers", {"stale_seconds": stale_seconds})

    async def definition_versions(self, *, stale_seconds: float) -> list[Row]:
        return await self._all("definition_versions", {"stale_seconds": stale_seconds})

    async def unserved_work(self, *, stale_seconds: float) -> dict[str, int]:
        """Due workflows no live worker serves, counted by served key (`type`, `type@N`)."""
        rows = await self._all("unserved_work", {"stale_seconds": stale_seconds})
        return {row["served"]: row["workflows"] for row in rows}

    async def search_workflows(self, *, q: str, id: UUID | None, limit: int) -> list[Row]:
        """Workflows whose id, idempotency key, type, user id or wallet address is `q`."""
        return await self._all("search_workflows", {"q": q, "id": id, "limit": limit})

    # The queue: claims, fenced results, leases and the worker registry.

    async def claim_due_workflows(
        self,
        *,
        worker_id: str,
        served: list[str],
        limit: int,
        lease_seconds: float,
        busy: list[UUID],
        definitions: StepDefinitions,
    ) -> list[ClaimedWorkflow]:
        """Claim up to `limit` due workflows and start their current steps; a workflow
        never started takes the shape of its version from `definitions`.

        `served`: the type and version keys to claim (engine.registry.served_key). `busy`:
        workflows not to claim (an earlier attempt may still run in this process).
        """
        params = {
            "worker_id": worker_id,
            "served": served,
            "limit": limit,
            "lease_seconds": lease_seconds,
            "busy": busy,
        }
        return await self._typed(ClaimedWorkflow, "claim_due_workflows", params | definitions.shapes)

    async def claim_granted_workflows(
        self,
        *,
        worker_id: str,
        granted: Sequence[Row],
        lease_seconds: float,
        definitions: StepDefinitions,
    ) -> list[ClaimedWorkflow]:
        """Claim the workflows grant_workflows chose (locked in this transaction), as
        claim_due_workflows claims."""
        params = {
            "worker_id": worker_id,
            "granted": [row["id"] for row in granted],
            "lease_seconds": lease_seconds,
        }
        return await self._typed(ClaimedWorkflow, "claim_granted_workflows", params | definitions.shapes)

    # Flow control (sql/queries/limits.sql).

    async def load_limits(self, types: list[str]) -> dict[str, TypeLimits]:
        """The limits that hold for `types`, and what each type's work is shared by, by
        type (types with none of these absent)."""
        return {
            row["type"]: TypeLimits(
                row["max_concurrency"], _rate(row["rate_limit"], row["rate_period_seconds"]), row["fair_by"]
            )
            for row in await self._all("load_limits", {"types": types})
        }

    async def provide_slots(self, types: list[str]) -> None:
        """Make the missing slots of each limited type of `types`."""
        await self._execute("provide_slots", {"types": types})

    async def provide_tokens(self, types: list[str]) -> None:
        """Make the missing rate tokens of each rate-limited type of `types`."""
        await self._execute("provide_tokens", {"types": types})

    async def due_flow_controlled_types(self, types: list[str]) -> list[str]:
        """In the claiming transaction: which of `types` have due work now."""
        return [row["type"] for row in await self._all("due_flow_controlled_types", {"types": types})]

    async def lock_slots(self, *, types: list[str], wanted: int) -> list[Row]:
        """In the claiming transaction: slots of `types` that may be taken (see the query)."""
        return await self._all("lock_slots", {"types": types, "wanted": wanted})

    async def lock_tokens(self, *, types: list[str], wanted: int) -> list[Row]:
        """In the claiming transaction: rate tokens of `types` that may be spent."""
        return await self._all("lock_tokens", {"types": types, "wanted": wanted})

    async def lock_fair_workflows(
        self, *, caps: Mapping[str, int], served: list[str], busy: list[UUID]
    ) -> list[Row]:
        """In the claiming transaction: up to `caps[type]` due workflows of each fair type,
        round-robin across its users, each with its place in the order (see the query)."""
        params = {"types": list(caps), "caps": list(caps.values()), "served": served, "busy": busy}
        return await self._all("lock_fair_workflows", params)

    async def grant_workflows(
        self,
        *,
        caps: Mapping[str, int],
        slots: Sequence[Row],
        fair_types: list[str],
        fair: Sequence[Row],
        served: list[str],
        busy: list[UUID],
        limit: int,
    ) -> list[Row]:
        """In the claiming transaction: the due workflows of the limited types that start
        now, at most `caps[type]` each, with the locked slot each takes; a fair type's
        from the rows lock_fair_workflows locked (see the query)."""
        params = {
            "cap_types": list(caps),
            "caps": list(caps.values()),
            "slot_types": [row["type"] for row in slots],
            "slots": [row["slot"] for row in slots],
            "fair_types": fair_types,
            "fair": [row["id"] for row in fair],
            "fair_orders": [row["fair_order"] for row in fair],
            "served": served,
            "busy": busy,
            "limit": limit,
        }
        return await self._all("grant_workflows", params)

    async def take_slots(self, granted: Sequence[Row]) -> None:
        """In the claiming transaction, after the claim: each granted slot to its
        workflow's new lease (rows of grant_workflows with a slot)."""
        params = {
            "types": [row["type"] for row in granted],
            "slots": [row["slot"] for row in granted],
            "ids": [row["id"] for row in granted],
        }
        await self._execute("take_slots", params)

    async def spend_tokens(self, tokens: Sequence[Row]) -> None:
        """In the claiming transaction: stamp the locked `tokens`, one per step started."""
        params = {"types": [row["type"] for row in tokens], "tokens": [row["token"] for row in tokens]}
        await self._execute("spend_tokens", params)

    async def list_limits(self, type: str | None = None) -> list[Row]:
        """Every type's limit (or only `type`'s), with its use now."""
        return await self._all("list_limits", {"type": type})

    async def set_limit(
        self,
        *,
        type: str,
        max_concurrency: int | Unchanged | None,
        rate: RateLimit | Unchanged | None,
        set_by: str | None,
    ) -> None:
        """An operator's limits over the definition's; UNCHANGED ones stay as they hold."""
        params = {
            "type": type,
            "concurrency_set": max_concurrency is not UNCHANGED,
            "max_concurrency": None if max_concurrency is UNCHANGED else max_concurrency,
            "rate_set": rate is not UNCHANGED,
            "rate_limit": rate.count if isinstance(rate, RateLimit) else None,
            "rate_period_seconds": rate.period_seconds if isinstance(rate, RateLimit) else None,
            "set_by": set_by,
        }
        await self._execute("set_limit", params)

    async def reset_limit(self, type: str) -> bool:
        """Drop an operator's limit; whether there was one."""
        return await self._execute("reset_limit", {"type": type}) > 0

    async def next_flow_rekey(self) -> Row | None:
        """In a transaction: a request for new flow keys that can be worked on now, locked
        (`type`, `new`: its first pass not begun, `last_pass`)."""
        return await self._one("next_flow_rekey", {})

    async def begin_flow_rekey(self, type: str) -> None:
        """Set the request's horizon: this statement's snapshot."""
        await self._execute("begin_flow_rekey", {"type": type})

    async def rekey_workflows(self, *, type: str, batch: int) -> int:
        """Give up to `batch` of the type's unfinished workflows their key; how many."""
        return await self._execute("rekey_workflows", {"type": type, "batch": batch})

    async def end_first_rekey_pass(self, type: str) -> None:
        await self._execute("end_first_rekey_pass", {"type": type})

    async def finish_flow_rekey(self, type: str) -> bool:
        """Drop the request if none of its rows is left; whether it went."""
        return await self._execute("finish_flow_rekey", {"type": type}) > 0

    async def create_steps(
        self,
        *,
        worker_id: str,
        digests: Mapping[UUID, str],
        definitions: StepDefinitions,
    ) -> None:
        """Create the step rows of first-claimed workflows (step 0 started), from the
        definition of the version the claim gave each.

        `digests`: {workflow id: the digest of its input, for the steps' keys}.
        """
        params = {"worker_id": worker_id, "ids": list(digests), "digests": list(digests.values())}
        async with self.connection() as conn:
            await conn.execute(query("create_steps"), params | definitions.steps)

    async def complete_steps(
        self, completions: Sequence[Completion], *, worker_id: str
    ) -> dict[UUID, Advanced]:
        """Commit many steps' outputs in one statement, each fenced by its own lease.

        Returns where each completion that landed left its workflow, by workflow id; a
        workflow missing from it had lost its lease, and nothing of it was written.
        """
        params = {
            "ids": [c.workflow_id for c in completions],
            "lease_tokens": [c.lease_token for c in completions],
            "step_indexes": [c.step_index for c in completions],
            "attempts": [c.attempt for c in completions],
            "outputs": [c.output_json for c in completions],
            "go_on": [c.go_on for c in completions],
            "workflow_outputs": [c.workflow_output_json for c in completions],
            "worker_id": worker_id,
        }
        return {row.id: row for row in await self._typed(Advanced, "complete_steps", params)}

    async def schedule_retry(self, failed: FailedAttempt, *, delay_seconds: float) -> bool:
        """Record a failed attempt (of the step, or of its compensation) and when to retry it.

        False when the lease was lost.
        """
        name = "schedule_compensation_retry" if failed.compensation else "schedule_retry"
        return await self._one(name, failed.params() | {"delay_seconds": delay_seconds}) is not None

    async def snooze_step(
        self, *, workflow_id: UUID, lease_token: UUID, step_index: int, attempt: int, worker_id: str,
        seconds: float, reason: str,
    ) -> bool:  # fmt: skip
        """Put a step that snoozed back to pending until `seconds` from now, releasing the
        lease; no retry is spent. False when the lease was lost."""
        params = {"id": workflow_id, "lease_token": lease_token, "step_index": step_index, "attempt": attempt,
                  "worker_id": worker_id, "seconds": seconds, "reason": reason}  # fmt: skip
        return await self._one("snooze_step", params) is not None

    async def fail_workflow(self, failed: FailedAttempt) -> bool:
        """Fail the workflow for good at this step (or at this step's compensation).

        False when the lease was lost.
        """
        name = "fail_compensation" if failed.compensation else "fail_workflow"
        return await self._one(name, failed.params()) is not None

    async def renew_leases(
        self, *, worker_id: str, leases: Mapping[UUID, UUID], lease_seconds: float
    ) -> dict[UUID, Renewal]:
        """Renew the given leases ({workflow id: lease token}) of this worker, never
        waiting for a locked row. A workflow missing from the result has lost its lease."""
        params = {
            "worker_id": worker_id,
            "ids": list(leases),
            "lease_tokens": list(leases.values()),
            "lease_seconds": lease_seconds,
        }
        return {row.id: row for row in await self._typed(Renewal, "renew_leases", params)}

    async def release_leases(self, *, worker_id: str, leases: Mapping[UUID, UUID]) -> set[UUID]:
        """Give back leases ({workflow id: lease token}), due at once; returns the ids released."""
        params = {"worker_id": worker_id, "ids": list(leases), "lease_tokens": list(leases.values())}
        return {row["id"] for row in await self._all("release_leases", params)}

    async def register_worker(
        self,
        *,
        worker_id: str,
        host: str,
        pid: int,
        types: list[str],
        priorities: list[int],
        limits: list[TypeLimits],
        served: list[str],
        concurrency: int,
    ) -> None:
        """Record this daemon in workflow_workers: its types, and the versions of them it
        serves (served keys); and declare its types' priorities and limits (one each, in
        the order of `types`)."""
        params = {
            "worker_id": worker_id,
            "host": host,
            "pid": pid,
            "types": types,
            "priorities": priorities,
            "max_concurrency": [limit.max_concurrency for limit in limits],
            "rate_limits": [limit.rate and limit.rate.count for limit in limits],
            "rate_periods": [limit.rate and limit.rate.period_seconds for limit in limits],
            "fair_by": [limit.fair_by for limit in limits],
            "served": served,
            "concurrency": concurrency,
        }
        async with self.connection() as conn:
            await conn.execute(query("register_worker"), params)

    async def stop_worker(self, *, worker_id: str) -> None:
        """Mark this daemon stopped."""
        async with self.connection() as conn:
            await conn.execute(query("stop_worker"), {"worker_id": worker_id})

    async def get_step(self, workflow_id: UUID, step_index: int) -> StepAttempts | None:
        """State and attempt counters of one step."""
        rows = await self._typed(StepAttempts, "get_step", {"id": workflow_id, "step_index": step_index})
        return rows[0] if rows else None

    async def begin_compensation(
        self, *, workflow_id: UUID, worker_id: str | None, actor: str | None = None
    ) -> str:
        """Start undoing a failed or cancelled workflow; returns its new state.

        `actor`: the operator whose command this is (None for a worker's own decision).
        """
        params = {"id": workflow_id, "worker_id": worker_id, "actor": actor}
        return str(await self._scalar("begin_compensation", params))

    async def cancel_at_boundary(self, *, workflow_id: UUID, lease_token: UUID, worker_id: str) -> bool:
        """Cancel a claimed workflow between two steps; False when it was not running under this lease."""
        params = {"id": workflow_id, "lease_token": lease_token, "worker_id": worker_id}
        return await self._one("cancel_at_boundary", params) is not None

    async def complete_compensation(
        self,
        *,
        workflow_id: UUID,
        lease_token: UUID,
        step_index: int,
        attempt: int,
        go_on: bool,
        worker_id: str,
    ) -> Advanced | None:
        """Record a step as compensated and move the cursor down; None when the lease was lost."""
        params = {
            "id": workflow_id,
            "lease_token": lease_token,
            "step_index": step_index,
            "attempt": attempt,
            "go_on": go_on,
            "worker_id": worker_id,
        }
        rows = await self._typed(Advanced, "complete_compensation", params)
        return rows[0] if rows else None

    async def get_step_progress(self, workflow_id: UUID) -> StepProgress | None:
        """Where a workflow stands, to settle a commit whose answer a dropped connection lost."""
        rows = await self._typed(StepProgress, "get_step_progress", {"id": workflow_id})
        return rows[0] if rows else None

    # The event relay (engine/relay.py), on the connection holding its lock.

    async def try_relay_lock(self, lock_id: int) -> bool:
        return bool(await self._scalar("try_relay_lock", {"lock_id": lock_id}))

    async def end_idle_relay_session(self, seconds: float) -> None:
        await self._execute("end_idle_relay_session", {"milliseconds": str(round(seconds * 1000))})

    async def open_relay(self, *, name: str) -> Row:
        """The relay's cursor, created at the current snapshot when it has none."""
        row = await self._one("open_relay", {"name": name})
        assert row is not None
        return row

    async def current_snapshot(self) -> str:
        return str(await self._scalar("current_snapshot", {}))

    async def relay_page(self, *, published: str, batch: str, after_id: int, limit: int) -> list[Row]:
        params = {
            **_snapshot_bounds(published),
            "batch": batch,
            "batch_xmax": snapshot_xmax(batch),
            "after_id": after_id,
            "limit": limit,
        }
        return await self._all("relay_page", params)

    async def save_relay_progress(
        self, *, name: str, published: str, batch: str | None, batch_through_id: int, count: int
    ) -> None:
        params = {
            "name": name,
            "published": published,
            "batch": batch,
            "batch_through_id": batch_through_id,
            "count": count,
        }
        await self._execute("save_relay_progress", params)

    async def relay_lag(self, *, published: str, batch: str | None, after_id: int) -> Row:
        params = {**_snapshot_bounds(published), "batch": batch, "after_id": after_id}
        row = await self._one("relay_lag", params)
        assert row is not None
        return row


def snapshot_xmax(snapshot: str) -> str:
    """The xmax of a pg_snapshot's text, `xmin:xmax:xip,...` (as text: an xid8 is
    unsigned, wider than any integer type the driver would send)."""
    return snapshot.split(":")[1]


def _snapshot_bounds(published: str) -> dict[str, Any]:
    """A published snapshot and its bounds, as the relay's queries take them."""
    in_progress = published.split(":")[2]
    return {
        "published": published,
        "published_xmax": snapshot_xmax(published),
        "published_xip": [xid for xid in in_progress.split(",") if xid],
    }


def _rate(count: int | None, period_seconds: float | None) -> RateLimit | None:
    return RateLimit(count, period_seconds) if count is not None and period_seconds is not None else None
