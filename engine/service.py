"""WorkflowService: the Python API to start and inspect workflows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from engine.definitions import MAX_RETRIES_DEFAULT
from engine.errors import WorkflowEngineError, WorkflowNotFoundError
from engine.idempotency import canonical_json
from engine.records import ExecutionSummary, StartResult, StepRecord, WorkflowPage, WorkflowRecord
from engine.registry import Registry
from engine.states import WorkflowState
from engine.store import Store
from engine.summary import summarize

LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
POOL_SIZE_DEFAULT = 4


class InvalidWorkflowIdError(WorkflowEngineError, ValueError):
    """A workflow id that is not a UUID."""


def parse_workflow_id(workflow_id: UUID | str) -> UUID:
    """A UUID from a UUID or its text; anything else is an `InvalidWorkflowIdError`."""
    if isinstance(workflow_id, UUID):
        return workflow_id
    try:
        return UUID(str(workflow_id))
    except ValueError:
        raise InvalidWorkflowIdError(f"{workflow_id!r} is not a workflow id (a UUID)") from None


class WorkflowService:
    """Start workflows and read their state.

    Starting is idempotent: the same type, user and input (in any key order) map to one
    workflow, also when many callers race. A type this process has a definition for is
    validated against its input model at once; an unknown type may still be started,
    because another daemon may serve it.
    """

    def __init__(self, store: Store, registry: Registry | None = None) -> None:
        self.store = store
        self.registry = registry or Registry()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, conninfo: str, registry: Registry | None = None, *, pool_size: int = POOL_SIZE_DEFAULT
    ) -> AsyncIterator[WorkflowService]:
        """A service on its own connection pool, closed when the block ends."""
        pool = AsyncConnectionPool(
            conninfo, min_size=1, max_size=pool_size, open=False, kwargs={"autocommit": True}
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
        priority: int = 0,
    ) -> StartResult:
        """Start a workflow, or find the one this start duplicates."""
        canonical_json(input)  # refuses what is not JSON before it reaches the database
        definition = self.registry.get(type)
        if definition is not None:
            definition.validate_input(input)
        row = await self.store.insert_workflow(
            type=type,
            input=input,
            user_id=user_id,
            wallet_address=wallet_address,
            total_steps=len(definition.steps) if definition else 0,
            max_retries=definition.max_retries if definition else MAX_RETRIES_DEFAULT,
            requires_compensation=definition.requires_compensation if definition else False,
            priority=priority,
        )
        if row is not None:
            return StartResult(workflow=WorkflowRecord.model_validate(row), created=True)
        # The key exists. Its row is committed: ON CONFLICT waited for the other insert,
        # and this new statement reads a new snapshot.
        existing = await self.store.get_workflow_by_start(type=type, input=input, user_id=user_id)
        if existing is None:  # deleted in between: rare, and a retry settles it
            return await self.start(type, input, user_id, wallet_address, priority=priority)
        return StartResult(workflow=WorkflowRecord.model_validate(existing), created=False)

    async def start_workflow(
        self,
        type: str,
        input: Mapping[str, Any],
        user_id: str | None,
        wallet_address: str | None = None,
        *,
        priority: int = 0,
    ) -> WorkflowRecord:
        """Start a workflow and return it; a duplicate start returns the existing one."""
        result = await self.start(type, input, user_id, wallet_address, priority=priority)
        return result.workflow

    async def get_workflow(self, workflow_id: UUID | str) -> WorkflowRecord:
        """One workflow; `WorkflowNotFoundError` if there is none with this id."""
        key = parse_workflow_id(workflow_id)
        row = await self.store.get_workflow(key)
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
        if page < 1 or limit < 1:
            raise ValueError("page and limit start at 1")
        limit = min(limit, LIST_LIMIT_MAX)
        state_name = WorkflowState(state).value if state is not None else None
        filters = {"state": state_name, "type": type, "user_id": user_id}
        rows = await self.store.list_workflows(**filters, limit=limit, offset=(page - 1) * limit)
        total = await self.store.count_workflows(**filters)
        items = [WorkflowRecord.model_validate(row) for row in rows]
        return WorkflowPage(items=items, page=page, limit=limit, total=total)

    async def get_execution_summary(self, workflow_id: UUID | str) -> ExecutionSummary:
        """Progress, current step, durations, retries and last error of a workflow."""
        workflow = await self.get_workflow(workflow_id)
        steps = [StepRecord.model_validate(row) for row in await self.store.get_steps(workflow.id)]
        return summarize(workflow, steps, self.registry.get(workflow.type))
