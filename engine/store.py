"""The SQL access layer: one method per named query of sql/queries.sql.

A `Store` is built from a connection pool, or bound to one connection; `transaction()`
yields a store bound to an open transaction with the same methods, so the same code
runs inside or outside a transaction (and a transactional step's writes can share the
transaction that records its completion).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from engine.sqlfiles import query

Row = dict[str, Any]


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

    async def _one(self, name: str, params: Mapping[str, Any]) -> Row | None:
        async with self.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(query(name), params)
            return await cursor.fetchone()

    async def _all(self, name: str, params: Mapping[str, Any]) -> list[Row]:
        async with self.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
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
        input: Any,
        user_id: str | None,
        wallet_address: str | None,
        total_steps: int,
        max_retries: int,
        requires_compensation: bool,
        priority: int,
    ) -> Row | None:
        """Insert a pending workflow; None when its idempotency key already exists."""
        return await self._one(
            "insert_workflow",
            {
                "type": type,
                "input": Jsonb(input),
                "user_id": user_id,
                "wallet_address": wallet_address,
                "total_steps": total_steps,
                "max_retries": max_retries,
                "requires_compensation": requires_compensation,
                "priority": priority,
            },
        )

    async def get_workflow_by_start(
        self, *, type: str, input: Any, user_id: str | None
    ) -> Row | None:
        """The workflow that a start with these arguments maps to, if any."""
        params = {"type": type, "input": Jsonb(input), "user_id": user_id}
        return await self._one("get_workflow_by_start", params)

    async def get_workflow(self, workflow_id: UUID) -> Row | None:
        """One workflow row by id."""
        return await self._one("get_workflow", {"id": workflow_id})

    async def get_steps(self, workflow_id: UUID) -> list[Row]:
        """The step rows of a workflow, in order (none before its first claim)."""
        return await self._all("get_steps", {"id": workflow_id})

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

    async def count_workflows(
        self, *, state: str | None, type: str | None, user_id: str | None
    ) -> int:
        """How many workflows match the listing's filters."""
        count = await self._scalar(
            "count_workflows", {"state": state, "type": type, "user_id": user_id}
        )
        return int(count)

    async def workflow_idempotency_key(self, *, type: str, user_id: str | None, input: Any) -> str:
        """The database's own computation of a workflow key."""
        params = {"type": type, "user_id": user_id, "input": Jsonb(input)}
        return str(await self._scalar("workflow_idempotency_key", params))

    async def step_idempotency_key(
        self, *, workflow_key: str, step_name: str, step_input: Any
    ) -> str:
        """The database's own computation of a step key."""
        params = {
            "workflow_key": workflow_key,
            "step_name": step_name,
            "step_input": Jsonb(step_input),
        }
        return str(await self._scalar("step_idempotency_key", params))

    async def canonical_json(self, value: Any) -> str:
        """The database's canonical text of a JSON value."""
        return str(await self._scalar("canonical_json", {"value": Jsonb(value)}))
