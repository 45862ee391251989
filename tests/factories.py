"""Factories that insert workflows and steps in any state, to stage a situation directly."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

JSON_COLUMNS = frozenset({"input", "output", "error", "context", "config"})


def _insert(conn: psycopg.Connection[Any], table: str, values: dict[str, Any]) -> dict[str, Any]:
    """INSERT one row of any columns (JSON columns wrapped) and return it."""
    params = {name: Jsonb(value) if name in JSON_COLUMNS else value for name, value in values.items()}
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, params)),
        sql.SQL(", ").join(map(sql.Placeholder, params)),
    )
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(statement, params)
        row = cursor.fetchone()
    assert row is not None
    return row


def insert_workflow(
    conn: psycopg.Connection[Any],
    *,
    type: str = "test_flow",
    input: dict[str, Any] | None = None,
    user_id: str | None = "user-1",
    **columns: Any,
) -> dict[str, Any]:
    """Insert one workflow with any column values; returns the row."""
    values = {"type": type, "input": input or {"n": uuid.uuid4().hex}, "user_id": user_id}
    return _insert(conn, "workflows", values | columns)


def insert_step(
    conn: psycopg.Connection[Any],
    workflow: dict[str, Any],
    step_index: int,
    step_name: str,
    **columns: Any,
) -> dict[str, Any]:
    """Insert one step row of `workflow` with any column values; returns the row."""
    values = {
        "workflow_id": workflow["id"],
        "step_index": step_index,
        "step_name": step_name,
        "idempotency_key": f"step:{step_name}:{workflow['id']}",
    }
    return _insert(conn, "workflow_steps", values | columns)


OUTCOME_UNKNOWN_ERROR = {
    "type": "OutcomeUnknown",
    "message": "outcome unknown: the worker running step 'transfer' (attempt 1) stopped before recording "
    "its result, and the step is not idempotent, so it is not run again",
    "step": "transfer",
    "attempt": 1,
}


def insert_outcome_unknown_failure(
    conn: psycopg.Connection[Any], *, type: str = "transfer_funds", **columns: Any
) -> dict[str, Any]:
    """A workflow failed as the worker leaves it when a non-idempotent step was interrupted:
    its one step `transfer` failed with `OutcomeUnknown` (it may have taken effect)."""
    workflow = insert_workflow(
        conn, type=type, state="failed", total_steps=1, error=OUTCOME_UNKNOWN_ERROR, **columns
    )
    step = {"state": "failed", "is_idempotent": False, "attempt": 1, "error": OUTCOME_UNKNOWN_ERROR}
    insert_step(conn, workflow, 0, "transfer", **step)
    return workflow
