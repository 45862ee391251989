"""Every statement of the hot path keeps its plan whatever the statistics say.

The life that breaks plans: idle daemons on nearly empty tables, which the autovacuum
analyzes while they hold a few dozen rows; the worker's connections cache generic plans
made for that size; then a burst of 20,000 workflows. Here each hot statement is
prepared and planned (generic) right after such an ANALYZE, the burst is inserted, and
the plan the session would now reuse is read back: under the worker's pins
(sql/queries/plans.sql) every row of the engine's tables is found through an index
lookup, never a scan of a whole table; without them the same life yields plans that
read whole tables for each batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg

from daemon.process import worker_session
from engine.sqlfiles import parse_queries, query, sql_dir

# The statements the worker runs, by the files that hold them; the claiming
# transaction's own opening (no parameters, its settings) is read separately.
HOT_FILES = ("claim.sql", "advance.sql", "fail_and_compensate.sql", "leases.sql")
# And the claim of limited types (the rest of limits.sql runs every 2 s, or for operators).
HOT_LIMITS = (
    "lock_slots",
    "lock_tokens",
    "lock_fair_workflows",
    "grant_workflows",
    "take_slots",
    "spend_tokens",
)
# And the relay's, on its leader's pinned connection (sql/queries/relay.sql).
HOT_RELAY = ("relay_page", "relay_lag")
# Run in the claiming transaction, under its own settings too.
IN_CLAIM = {"claim_due_workflows", "claim_granted_workflows", *HOT_LIMITS}
CLAIM_OPENING = "claiming_transaction"
ENGINE_TABLES = {"workflows", "workflow_steps", "workflow_events", "workflow_workers"}
# Index lookups by key, and the claim's ordered walk of the due index.
LOOKUPS = {
    "workflows_pkey", "workflow_steps_pkey", "workflow_workers_pkey", "workflows_due_idx", "workflows_due_flow_controlled_idx",
    "workflow_events_tx_idx",
}  # fmt: skip
NEARLY_EMPTY = 50
BURST = 20_000
PARAMETER = re.compile(r"%\((\w+)\)[sb]")
PINS = {
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "plan_cache_mode": "force_generic_plan",
    "jit": "off",
}


def hot_statements() -> list[str]:
    names = [
        name
        for file in HOT_FILES
        for name in parse_queries((sql_dir() / "queries" / file).read_text(encoding="utf-8"))
    ]
    return [name for name in names if name != CLAIM_OPENING] + list(HOT_LIMITS) + list(HOT_RELAY)


def prepare(conn: psycopg.Connection[Any], name: str) -> None:
    """PREPARE the named query as psycopg would send it ($n for each named parameter)."""
    order: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    text = PARAMETER.sub(numbered, query(name)).replace("%%", "%")
    conn.execute(f"PREPARE {name} AS {text}")  # type: ignore[arg-type]


def cached_plan(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    """The generic plan of a prepared statement: made on the first call, then reused."""
    row = conn.execute(
        "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = %s", (name,)
    ).fetchone()
    arguments = ", ".join(["NULL"] * int(row[0]))  # type: ignore[index]
    in_claim = name in IN_CLAIM
    if in_claim:
        conn.execute(query(CLAIM_OPENING))
    (plan,) = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({arguments})").fetchone()  # type: ignore[misc]
    if in_claim:
        conn.execute("COMMIT")
    return plan[0]["Plan"]  # type: ignore[no-any-return]


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def whole_table_reads(plan: dict[str, Any]) -> list[str]:
    """Every way the plan reads an engine table other than an index lookup by key."""
    found = []
    for node in nodes(plan):
        kind, table, index = node["Node Type"], node.get("Relation Name"), node.get("Index Name")
        if (
            kind == "Bitmap Heap Scan"
            and {child.get("Index Name") for child in nodes(node)} - {None} <= LOOKUPS
        ):
            continue  # the rows of index lookups (the relay's xid ranges), no more
        if table in ENGINE_TABLES and kind != "ModifyTable" and index not in LOOKUPS:
            found.append(f"{kind} on {table}" + (f" using {index}" if index else ""))
        if kind in ("Hash Join", "Merge Join"):
            found.append(kind)
    return found


def plans_after_a_burst(url: str, *, pinned: bool) -> dict[str, dict[str, Any]]:
    """Each hot statement's cached plan, made when the tables were analyzed nearly empty,
    read back after a burst."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input, total_steps) "
            "SELECT 'noop', jsonb_build_object('n', n), 1 FROM generate_series(1, %s) n",
            (NEARLY_EMPTY,),
        )
        conn.execute(
            "INSERT INTO workflow_steps (workflow_id, step_index, step_name, idempotency_key) "
            "SELECT id, 0, 'only', id::text FROM workflows"
        )
        conn.execute("INSERT INTO workflow_events (workflow_id, from_state, to_state) SELECT id, 'pending', 'running' FROM workflows")  # fmt: skip
        conn.execute("ANALYZE workflows, workflow_steps, workflow_events, workflow_workers")
        if pinned:
            conn.execute(query("pin_hot_plans"))
        # Generic plans at once (psycopg's prepared statements reach them on the sixth run).
        conn.execute("SET plan_cache_mode = force_generic_plan")
        names = hot_statements()
        for name in names:
            prepare(conn, name)
            cached_plan(conn, name)
        conn.execute(
            "INSERT INTO workflows (type, input, total_steps) "
            "SELECT 'noop', jsonb_build_object('burst', n), 1 FROM generate_series(1, %s) n",
            (BURST,),
        )
        conn.execute(
            "INSERT INTO workflow_steps (workflow_id, step_index, step_name, idempotency_key) "
            "SELECT id, 0, 'only', id::text FROM workflows ON CONFLICT DO NOTHING"
        )
        return {name: cached_plan(conn, name) for name in names}


def test_under_the_pins_every_hot_statement_finds_its_rows_by_index_after_a_burst(db_url: str) -> None:
    plans = plans_after_a_burst(db_url, pinned=True)
    assert len(plans) >= 12
    assert {name: whole_table_reads(plan) for name, plan in plans.items() if whole_table_reads(plan)} == {}
    # The claim walks the due index in order and stops at its limit: nothing sorted.
    claim = list(nodes(plans["claim_due_workflows"]))
    assert not [node for node in claim if node["Node Type"] in ("Sort", "Incremental Sort")]
    assert any(node.get("Index Name") == "workflows_due_idx" for node in claim)


def test_without_the_pins_the_same_life_reads_whole_tables(db_url: str) -> None:
    # The premise of the test above: the hazard is real on this server.
    plans = plans_after_a_burst(db_url, pinned=False)
    spoiled = {name for name, plan in plans.items() if whole_table_reads(plan)}
    assert {"create_steps", "complete_steps"} <= spoiled, spoiled


def test_a_transactional_steps_sql_plans_as_configured_and_the_completion_under_the_pins(
    db: psycopg.Connection[Any],
) -> None:
    db.execute(query("pin_hot_plans"))
    with db.transaction():
        db.execute(query("unpin_hot_plans"))
        assert db.execute("SHOW enable_seqscan").fetchone() == ("on",)
        assert db.execute("SHOW plan_cache_mode").fetchone() == ("auto",)
        assert db.execute("SHOW jit").fetchone() == ("on",)
        db.execute(query("pin_hot_plans"))
        assert db.execute("SHOW enable_hashjoin").fetchone() == ("off",)
    assert db.execute("SHOW enable_seqscan").fetchone() == ("off",)
    with db.transaction(force_rollback=True):
        db.execute(query("unpin_hot_plans"))
    assert db.execute("SHOW enable_mergejoin").fetchone() == ("off",)


async def test_a_worker_session_opens_pinned(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await worker_session(conn)
        cursor = await conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(PINS),)
        )
        assert dict(await cursor.fetchall()) == PINS
