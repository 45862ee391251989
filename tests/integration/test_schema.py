"""The migrated schema: its shape, the plain-SQL insert path, and the NOTIFY trigger."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

SNAPSHOT = Path(__file__).with_name("schema.snapshot")

_SNAPSHOT_QUERIES = {
    "enum": """
        SELECT t.typname || ': ' || string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public'
        GROUP BY t.typname ORDER BY 1""",
    "column": """
        SELECT table_name || '.' || column_name || ' ' || udt_name
               || CASE WHEN is_nullable = 'NO' THEN ' not null' ELSE '' END
               || coalesce(' default ' || column_default, '')
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, ordinal_position""",
    "constraint": """
        SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
          -- PostgreSQL 18 lists NOT NULL as constraints too; the columns show them already.
          AND contype <> 'n'
        ORDER BY 1""",
    "index": "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname",
    "trigger": """
        SELECT pg_get_triggerdef(oid) FROM pg_trigger
        WHERE NOT tgisinternal ORDER BY tgname""",
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') '
               || pg_get_function_result(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1""",
    "storage": """
        SELECT relname || ' ' || array_to_string(reloptions, ',') FROM pg_class
        WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL ORDER BY 1""",
}


def schema_snapshot(conn: psycopg.Connection[Any]) -> str:
    lines = []
    for kind, statement in _SNAPSHOT_QUERIES.items():
        lines.extend(f"{kind} {row[0]}" for row in conn.execute(statement))  # type: ignore[call-overload]
    return "\n".join(lines) + "\n"


def test_migrations_produce_the_expected_schema(db: psycopg.Connection[Any]) -> None:
    actual = schema_snapshot(db)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(actual)
    assert actual == SNAPSHOT.read_text(), "schema changed: review it, then rerun with UPDATE_SNAPSHOTS=1"


def test_state_enums_hold_exactly_the_seed_states(db: psycopg.Connection[Any]) -> None:
    labels = dict(
        db.execute(
            "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_type t "
            "JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname"
        ).fetchall()
    )
    assert labels["workflow_state"] == [
        "pending", "running", "completed", "failed", "cancelled", "compensating", "compensated",
    ]  # fmt: skip
    assert labels["step_state"] == [
        "pending", "running", "completed", "failed", "skipped", "compensating", "compensated",
    ]  # fmt: skip


def test_plain_sql_insert_creates_a_valid_pending_workflow_due_now(
    db: psycopg.Connection[Any],
) -> None:
    with db.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            "INSERT INTO workflows (type, input, user_id, wallet_address) "
            """VALUES ('contract_deployment', '{"contractName": "Token"}', 'u-42', '0xabc') """
            "RETURNING *, now() AS inserted_at"
        )
        row = cursor.fetchone()
    assert row is not None
    assert row["state"] == "pending"
    assert row["id"] is not None
    assert row["next_retry_at"] == row["inserted_at"]
    assert row["idempotency_key"].startswith("workflow:contract_deployment:u-42:")
    assert len(row["idempotency_key"].rsplit(":", 1)[1]) == 64
    assert (
        row["current_step_index"],
        row["retry_count"],
        row["locked_by"],
        row["lease_token"],
    ) == (0, 0, None, None)
    assert row["cancel_requested"] is False


def test_new_ids_are_uuidv7_ordered_by_their_creation(db: psycopg.Connection[Any]) -> None:
    ids = []
    for n in range(3):
        (workflow_id,) = db.execute(
            "INSERT INTO workflows (type, input, user_id) VALUES ('t', jsonb_build_object('n', %s::int), 'u') "
            "RETURNING id",
            (n,),
        ).fetchone()  # type: ignore[misc]
        ids.append(workflow_id)
        time.sleep(0.002)  # a new millisecond: the order of ids within one is random
    assert [workflow_id.version for workflow_id in ids] == [7, 7, 7]
    assert ids == sorted(ids)
    (created_ms,) = db.execute("SELECT (extract(epoch FROM created_at) * 1000)::bigint FROM workflows WHERE id = %s",
                               (ids[0],)).fetchone()  # type: ignore[misc]  # fmt: skip
    assert abs((ids[0].int >> 80) - created_ms) < 1000  # the first 48 bits are its creation, in ms
    (step_id,) = db.execute(
        "INSERT INTO workflow_steps (workflow_id, step_index, step_name, idempotency_key) "
        "VALUES (%s, 0, 's', 'k') RETURNING id",
        (ids[0],),
    ).fetchone()  # type: ignore[misc]
    assert step_id.version == 7


def test_duplicate_sql_insert_is_refused_and_on_conflict_do_nothing_works(
    db: psycopg.Connection[Any],
) -> None:
    insert = "INSERT INTO workflows (type, input, user_id) VALUES ('t', %s::jsonb, 'u')"
    db.execute(insert, ('{"a": 1, "b": [1, 2]}',))
    # The same input in another key order and spelling is the same workflow.
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(insert, ('{ "b": [1.0, 2],  "a": 1e0 }',))
    cursor = db.execute(
        insert + " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id", ('{"b":[1,2],"a":1}',)
    )
    assert cursor.fetchall() == []
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


def test_an_explicit_idempotency_key_is_kept(db: psycopg.Connection[Any]) -> None:
    row = db.execute(
        "INSERT INTO workflows (type, input, user_id, idempotency_key) VALUES ('t', '{}', 'u', 'order-7') "
        "RETURNING idempotency_key"
    ).fetchone()
    assert row == ("order-7",)


def test_the_claim_index_holds_only_runnable_rows(db: psycopg.Connection[Any]) -> None:
    definition = db.execute("SELECT pg_get_indexdef('workflows_due_idx'::regclass)").fetchone()
    assert definition is not None
    assert (
        "WHERE (state = ANY (ARRAY['pending'::workflow_state, 'running'::workflow_state, 'compensating'::workflow_state]))"
        in definition[0]
    )
    db.execute(
        "INSERT INTO workflows (type, input, user_id, state) "
        "SELECT 't', jsonb_build_object('n', n), 'u', 'completed' FROM generate_series(1, 2000) n"
    )
    db.execute("INSERT INTO workflows (type, input, user_id) VALUES ('t', '{}', 'u')")
    db.execute("ANALYZE workflows")
    plan = db.execute(
        "EXPLAIN SELECT id FROM workflows WHERE state IN ('pending', 'running', 'compensating') "
        "AND next_retry_at <= now() ORDER BY priority, next_retry_at LIMIT 10"
    ).fetchall()
    assert "workflows_due_idx" in "\n".join(line for (line,) in plan)


def test_insert_notifies_once_per_statement(db_url: str, db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN workflowd")
        db.execute(
            "INSERT INTO workflows (type, input, user_id) "
            "SELECT 't', jsonb_build_object('n', n), 'u' FROM generate_series(1, 50) n"
        )
        db.execute("INSERT INTO workflows (type, input, user_id) VALUES ('t', '{\"one\": true}', 'u')")
        received = []
        # Wait for the socket rather than sleeping: both notifications are already sent.
        while select.select([listener.fileno()], [], [], 1.0)[0]:
            received.extend(listener.notifies(timeout=0.1))
            if len(received) >= 2:
                break
        received.extend(listener.notifies(timeout=0.5))
    assert [note.channel for note in received] == ["workflowd", "workflowd"]
