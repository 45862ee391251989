"""Factories that insert workflows and steps in any state, to stage a situation directly."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


def insert_workflow(
    conn: psycopg.Connection[Any],
    *,
    type: str = "test_flow",
    input: dict[str, Any] | None = None,
    user_id: str | None = "user-1",
    **columns: Any,
) -> dict[str, Any]:
    """Insert one workflow with any column values; returns the row."""
    values: dict[str, Any] = {
        "type": type,
        "input": Jsonb(input or {"n": uuid.uuid4().hex}),
        "user_id": user_id,
    }
    values.update(
        {
            name: Jsonb(value) if name in {"output", "error", "context"} else value
            for name, value in columns.items()
        }
    )
    names = ", ".join(values)
    placeholders = ", ".join(f"%({name})s" for name in values)
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"INSERT INTO workflows ({names}) VALUES ({placeholders}) RETURNING *", values)  # type: ignore[arg-type]
        row = cursor.fetchone()
    assert row is not None
    return row


def insert_step(
    conn: psycopg.Connection[Any],
    workflow: dict[str, Any],
    step_index: int,
    step_name: str,
    **columns: Any,
) -> dict[str, Any]:
    """Insert one step row of `workflow` with any column values; returns the row."""
    values: dict[str, Any] = {
        "workflow_id": workflow["id"],
        "step_index": step_index,
        "step_name": step_name,
        "idempotency_key": f"step:{step_name}:{workflow['id']}",
    }
    values.update(
        {
            name: Jsonb(value) if name in {"input", "output", "error", "config"} else value
            for name, value in columns.items()
        }
    )
    names = ", ".join(values)
    placeholders = ", ".join(f"%({name})s" for name in values)
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"INSERT INTO workflow_steps ({names}) VALUES ({placeholders}) RETURNING *", values)  # type: ignore[arg-type]
        row = cursor.fetchone()
    assert row is not None
    return row
