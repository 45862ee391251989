"""Fairness between users (Workflow(fair_by="user_id")) against a real database: the
trigger gives each row of a fair type its user's key, and the claim shares a fair type's
due work round-robin across users, whatever one user has queued."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import psycopg
import pytest

from engine import DefinitionError, Registry, Step, Workflow, WorkflowService, flow
from engine.store import StepDefinitions, Store
from tests.factories import insert_workflow


def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


FAIR = Workflow(type="fair", fair_by="user_id", steps=[Step("only", _noop)])
REGISTRY = Registry([FAIR])


async def declare(store: Store) -> None:
    await store.register_worker(
        worker_id="declaring", host=socket.gethostname(), pid=1, types=REGISTRY.types,
        priorities=REGISTRY.priorities, limits=REGISTRY.limits, served=REGISTRY.served, concurrency=1,
    )  # fmt: skip


async def claim(store: Store, room: int) -> list[str]:
    """One claim of `room`, as a worker makes it; the users of the workflows claimed."""
    async with store.claiming_transaction() as tx:
        limits = await tx.load_limits(["fair"])
        rows = await flow.claim_limited(
            tx, limits=limits, worker_id="w", served=REGISTRY.served, busy=[], room=room, lease_seconds=30,
            definitions=StepDefinitions.of(REGISTRY),
        )  # fmt: skip
    return [str(row.user_id) for row in rows]


def queue(db: psycopg.Connection[Any], user: str, count: int, **columns: Any) -> None:
    db.execute(
        "INSERT INTO workflows (type, input, user_id) SELECT 'fair', jsonb_build_object('n', n), %s "
        "FROM generate_series(1, %s) n",
        (user, count),
    )


async def test_a_user_behind_another_users_ten_thousand_is_claimed_in_the_first_batch(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    await declare(service.store)
    queue(db, "alice", 10_000)
    late = insert_workflow(db, type="fair", user_id="bob", input={"n": 1})
    assert late["fair_key"] != 0
    first = await claim(service.store, 10)
    assert "bob" in first
    assert Counter(first) == {"alice": 5, "bob": 1}  # an equal share each; bob has one
    assert Counter(await claim(service.store, 10)) == {"alice": 10}


async def test_many_users_share_each_batch(service: WorkflowService, db: psycopg.Connection[Any]) -> None:
    await declare(service.store)
    for user in ("u1", "u2", "u3"):
        queue(db, user, 20)
    urgent = insert_workflow(db, type="fair", user_id="u4", input={"n": 0})
    batch = await claim(service.store, 7)
    assert Counter(batch) == {"u1": 2, "u2": 2, "u3": 2, "u4": 1}
    assert db.execute("SELECT locked_by FROM workflows WHERE id = %s", (urgent["id"],)).fetchone() == ("w",)
    # Every user gets a turn in every batch while it has due work, until all is claimed.
    claimed = 7
    while batch := await claim(service.store, 9):
        assert len(set(batch)) == min(3, len(batch)), batch
        claimed += len(batch)
    assert claimed == 61


async def test_rows_of_other_types_carry_no_key_and_a_bad_fair_by_is_refused(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    await declare(service.store)
    assert insert_workflow(db, type="not_fair", user_id="alice")["fair_key"] is None
    alice, nobody = (
        insert_workflow(db, type="fair", user_id="alice"),
        insert_workflow(db, type="fair", user_id=None),
    )
    assert alice["fair_key"] != nobody["fair_key"]
    with pytest.raises(DefinitionError, match="fair_by names what work is shared by: user_id, not 'wallet'"):
        Workflow(type="fair", fair_by="wallet", steps=FAIR.steps)
