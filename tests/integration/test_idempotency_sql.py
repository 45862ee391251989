"""Python and SQL compute the same canonical JSON and the same idempotency keys."""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from engine import WorkflowService
from engine.idempotency import canonical_json, step_idempotency_key, workflow_idempotency_key

AWKWARD_INPUTS: list[Any] = [
    {},
    {"b": 1, "a": 2, "aa": 3, "B": 4},
    {"amount": 1.0, "count": 1e3, "tiny": 1e-7, "big": 1e21, "neg": -0.0, "exact": 0.1},
    {"price": 12.50, "n": 10, "f": 3.14159265358979},
    {
        "text": "héllo wörld ✓ 😀 中文",
        "ctrl": "tab\there\nnewline\u0001\u001f",
        "quote": 'say "hi" \\ /',
    },
    {"é": 1, "e": 2, "😀": 3, "z": 4, "\u00ff": 5},
    {"nested": {"z": [1, {"y": None, "x": True}], "a": {"k": [False, [], {}]}}},
    {"list": [3, 1, 2], "empty": "", "null": None},
    {"int_big": 123456789012345678901234567890, "negative": -42},
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _sql_canonical(db: psycopg.Connection[Any], value: Any) -> str:
    row = db.execute("SELECT workflow_canonical_json(%s)", (Jsonb(value),)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("value", AWKWARD_INPUTS)
def test_canonical_json_agrees_on_awkward_inputs(db: psycopg.Connection[Any], value: Any) -> None:
    assert canonical_json(value) == _sql_canonical(db, value)


@settings(
    max_examples=int(os.environ.get("CANONICAL_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=json_values)
def test_canonical_json_agrees_on_generated_values(db: psycopg.Connection[Any], value: Any) -> None:
    assert canonical_json(value) == _sql_canonical(db, value)


def test_number_spellings_sent_as_raw_json_text_agree(db: psycopg.Connection[Any]) -> None:
    # A SQL user writes numbers as text: 1e3, 1.0 and 1000 are one value.
    raw = '{"a": 1e3, "b": 1.0, "c": 2.50, "d": -0.0}'
    row = db.execute("SELECT workflow_canonical_json(%s::jsonb)", (raw,)).fetchone()
    assert row == (canonical_json(json.loads(raw)),)
    assert row == ('{"a":1000,"b":1,"c":2.5,"d":0}',)


@pytest.mark.parametrize("value", AWKWARD_INPUTS)
def test_workflow_and_step_keys_agree(db: psycopg.Connection[Any], value: Any) -> None:
    row = db.execute(
        "SELECT workflow_idempotency_key('trade_execution', 'user-ü', %s), "
        "workflow_step_idempotency_key('workflow:x:y:z', 'execute_trade', %s)",
        (Jsonb(value), Jsonb(value)),
    ).fetchone()
    assert row == (
        workflow_idempotency_key("trade_execution", "user-ü", value),
        step_idempotency_key("workflow:x:y:z", "execute_trade", value),
    )


def test_a_null_user_id_counts_as_empty_on_both_sides(db: psycopg.Connection[Any]) -> None:
    row = db.execute("SELECT workflow_idempotency_key('t', NULL, '{}')").fetchone()
    assert row == (workflow_idempotency_key("t", None, {}),)
    assert row == ("workflow:t::" + workflow_idempotency_key("t", "", {}).rsplit(":", 1)[1],)


async def test_sql_insert_and_python_start_give_the_same_key(
    db: psycopg.Connection[Any], service: WorkflowService
) -> None:
    raw = '{"tokenB": "USDC", "amount": 1e3, "tokenA": "ETH", "slippage": 0.50}'
    row = db.execute(
        "INSERT INTO workflows (type, input, user_id) VALUES ('trade_execution', %s::jsonb, 'u7') "
        "RETURNING id, idempotency_key",
        (raw,),
    ).fetchone()
    assert row is not None
    started = await service.start(
        "trade_execution",
        {"tokenA": "ETH", "tokenB": "USDC", "amount": 1000, "slippage": 0.5},
        "u7",
    )
    assert started.created is False
    assert (started.workflow.id, started.workflow.idempotency_key) == row
    assert row[1] == workflow_idempotency_key("trade_execution", "u7", json.loads(raw))
