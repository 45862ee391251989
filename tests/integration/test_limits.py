"""Concurrency limits against a real database: where the limit comes from (the
definition a daemon declared, an operator's), the claim's slots under concurrent
claimers, a slot freed by any release of its lease and handed back to its own workflow
after the lease ran out."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import psycopg
import pytest

from engine import InvalidLimitError, Registry, Step, Workflow, WorkflowService, flow
from engine.limits import (
    CONCURRENCY_LIMIT_MAX,
    RATE_LIMIT_MAX,
    RATE_PERIOD_MAX_SECONDS,
    RATE_PERIOD_MIN_SECONDS,
    RateLimit,
    TypeLimits,
)
from engine.store import StepDefinitions, Store
from tests.factories import insert_workflow
from tests.integration.test_cli import workflowd


def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


LIMITED = Workflow(type="limited", max_concurrency=3, steps=[Step("only", _noop)])
SHAPES = StepDefinitions.of([LIMITED])
SERVED = Registry([LIMITED]).served  # limited, limited@1
LIMITS = TypeLimits(max_concurrency=3)


async def declare(store: Store, registry: Registry) -> None:
    await store.register_worker(
        worker_id="declaring", host=socket.gethostname(), pid=1, types=registry.types,
        priorities=registry.priorities, limits=registry.limits, served=registry.served,
        concurrency=1,
    )  # fmt: skip


async def claim_limited(store: Store, worker_id: str, wanted: int, limits: TypeLimits = LIMITS) -> list[Any]:
    """A limited claim, as a worker makes it."""
    async with store.claiming_transaction() as tx:
        rows = await flow.claim_limited(
            tx, limits={"limited": limits}, worker_id=worker_id, served=SERVED, busy=[], room=wanted,
            lease_seconds=30, definitions=SHAPES,
        )  # fmt: skip
    return [row.id for row in rows]


def leased(db: psycopg.Connection[Any]) -> int:
    (count,) = db.execute("SELECT count(*) FROM workflows WHERE locked_by IS NOT NULL").fetchone()  # type: ignore[misc]
    return int(count)


async def test_a_limit_comes_from_the_definition_unless_an_operator_set_one(
    service: WorkflowService, db_url: str
) -> None:
    await declare(service.store, Registry([LIMITED]))
    (limit,) = await service.list_limits()
    assert (limit.type, limit.max_concurrency, limit.overridden, limit.in_flight) == ("limited", 3, False, 0)
    changed = await service.set_limit("limited", 7, actor="ops")
    assert (changed.max_concurrency, changed.declared_max_concurrency, changed.set_by) == (7, 3, "ops")
    unlimited = await service.set_limit("limited", None)
    assert (unlimited.max_concurrency, unlimited.overridden) == (None, True)
    assert await service.store.load_limits(["limited"]) == {}
    back = await service.reset_limit("limited")
    assert back is not None
    assert (back.max_concurrency, back.overridden) == (3, False)
    assert await service.reset_limit("never_limited") is None
    for bad in (0, -1, True, 10**7):
        with pytest.raises(
            InvalidLimitError, match="a concurrency limit is a whole number from 1 to 1,000,000"
        ):
            await service.set_limit("limited", bad)

    env = {"DATABASE_URL": db_url}
    result = workflowd("limits", "set", "reindex", "--concurrency", "4", env=env)
    assert result.returncode == 0, result.stderr
    listed = workflowd("limits", "list", env=env).stdout
    assert "reindex" in listed
    assert "limited" in listed
    assert workflowd("limits", "reset", "reindex", env=env).stdout.strip() == "reindex: no limit"


async def test_concurrent_claimers_never_take_more_slots_than_the_limit(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    await declare(service.store, Registry([LIMITED]))
    await service.store.provide_slots(["limited"])
    for n in range(20):
        insert_workflow(db, type="limited", input={"n": n})
    claims = await asyncio.gather(*(claim_limited(service.store, f"w{n}", 5) for n in range(6)))
    assert sum(len(ids) for ids in claims) == 3 == leased(db)
    assert await claim_limited(service.store, "late", 5) == []

    # A lease released (a finish, a snooze, a failure, a shutdown) frees its slot at once.
    finished = next(ids for ids in claims if ids)[0]
    db.execute(
        "UPDATE workflows SET state = 'completed', completed_at = now(), locked_by = NULL, lease_token = NULL, "
        "lease_expires_at = NULL WHERE id = %s",
        (finished,),
    )
    assert len(await claim_limited(service.store, "next", 5)) == 1
    assert leased(db) == 3


async def test_a_slot_whose_lease_ran_out_goes_back_to_its_own_workflow_only(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    await declare(service.store, Registry([Workflow(type="limited", max_concurrency=1, steps=LIMITED.steps)]))
    await service.store.provide_slots(["limited"])
    first = insert_workflow(db, type="limited", input={"n": 1})["id"]
    (claimed,) = await claim_limited(service.store, "dead", 1, TypeLimits(max_concurrency=1))
    assert claimed == first
    other = insert_workflow(db, type="limited", input={"n": 2})["id"]
    db.execute("UPDATE workflows SET next_retry_at = now() - interval '1 hour' WHERE id = %s", (other,))
    # The holder's lease runs out (its daemon died): the workflow due first is the other
    # one, but the slot may go only to the expired holder, whose old daemon could still
    # renew a lease nobody took over.
    db.execute(
        "UPDATE workflows SET lease_expires_at = now() - interval '1 second', next_retry_at = now() - interval '1 second' "
        "WHERE id = %s",
        (first,),
    )
    assert await claim_limited(service.store, "rescuer", 1, TypeLimits(max_concurrency=1)) == [first]
    (holder,) = db.execute("SELECT locked_by FROM workflows WHERE id = %s", (first,)).fetchone()  # type: ignore[misc]
    assert holder == "rescuer"
    assert leased(db) == 1


RATED = Workflow(type="limited", rate_limit="3/min", steps=[Step("only", _noop)])


async def test_an_operator_sets_each_limit_on_its_own(service: WorkflowService) -> None:
    await declare(service.store, Registry([Workflow(type="limited", max_concurrency=3, rate_limit="10/s",
                                                    steps=LIMITED.steps)]))  # fmt: skip
    (declared,) = await service.list_limits()
    assert (declared.max_concurrency, declared.rate_limit, declared.overridden) == (3, "10/s", False)
    rated = await service.set_limit("limited", rate_limit="600/min", actor="ops")
    assert (rated.max_concurrency, rated.rate_limit, rated.declared_rate_limit) == (3, "600/min", "10/s")
    both = await service.set_limit("limited", 5)
    assert (both.max_concurrency, both.rate_limit) == (5, "600/min")
    unrated = await service.set_limit("limited", rate_limit=None)
    assert (unrated.max_concurrency, unrated.rate_limit) == (5, None)
    assert await service.store.load_limits(["limited"]) == {"limited": TypeLimits(max_concurrency=5)}
    back = await service.reset_limit("limited")
    assert back is not None
    assert (back.max_concurrency, back.rate_limit, back.overridden) == (3, "10/s", False)
    for bad, says in (("10", "a rate limit is a count per period"), ("0/s", "allows 1 to 100,000"),
                      ("5/0.5s", "from 1 second to 1 day"), ("10/fortnight", "a count per period")):  # fmt: skip
        with pytest.raises(InvalidLimitError, match=says):
            await service.set_limit("limited", rate_limit=bad)
    with pytest.raises(InvalidLimitError, match="name a concurrency limit, a rate limit or both"):
        await service.set_limit("limited")


async def test_concurrent_claimers_never_start_more_than_the_rate_in_a_period(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    await declare(service.store, Registry([RATED]))
    await service.store.provide_tokens(["limited"])
    for n in range(20):
        insert_workflow(db, type="limited", input={"n": n})
    rate = TypeLimits(rate=RateLimit(3, 60.0))
    claims = await asyncio.gather(*(claim_limited(service.store, f"w{n}", 5, rate) for n in range(6)))
    assert sum(len(ids) for ids in claims) == 3 == leased(db)
    # The claimed steps finish at once: the rate, not a lease, holds the next ones back.
    db.execute(
        "UPDATE workflows SET locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, next_retry_at = now()"
    )
    assert await claim_limited(service.store, "early", 5, rate) == []
    spent = db.execute(
        "SELECT count(*) FROM workflow_rate_tokens WHERE spent_at > now() - interval '1 minute'"
    )
    assert spent.fetchone() == (3,)
    # A minute later (the tokens' stamps moved back by one), three more start.
    db.execute("UPDATE workflow_rate_tokens SET spent_at = spent_at - interval '1 minute'")
    assert len(await claim_limited(service.store, "a_period_later", 5, rate)) == 3


async def test_stats_and_gauges_tell_a_limited_type_from_a_stuck_one(
    service: WorkflowService, db: psycopg.Connection[Any], db_url: str
) -> None:
    from daemon.metrics import QueueDepthCollector  # noqa: PLC0415 (a daemon part, used here only)

    await declare(service.store, Registry([Workflow(type="limited", max_concurrency=1, steps=LIMITED.steps)]))
    await service.store.provide_slots(["limited"])
    for n in range(3):
        insert_workflow(db, type="limited", input={"n": n}, next_retry_at="2026-01-01T00:00:00Z")
    insert_workflow(db, type="waiting", input={"n": 0}, next_retry_at="2026-01-01T00:00:00Z")
    await claim_limited(service.store, "w", 5, TypeLimits(max_concurrency=1))

    flow = {each.type: each for each in (await service.get_stats()).flow}
    limited, waiting = flow["limited"], flow["waiting"]
    # At its limit: its two due workflows are held back by it (limited, not stuck).
    assert (limited.in_flight, limited.max_concurrency, limited.due, limited.throttled) == (1, 1, 2, 2)
    # No limit holds the other back: its old due work waits for a daemon (or is stuck).
    assert (waiting.in_flight, waiting.max_concurrency, waiting.due, waiting.throttled) == (0, None, 1, 0)
    assert waiting.oldest_due_age_seconds is not None
    assert waiting.oldest_due_age_seconds > 86_400

    await service.set_limit("limited", rate_limit="5/min")
    collector = QueueDepthCollector()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await collector.run_once(conn)
    gauges = {
        (family.name, sample.labels["type"]): sample.value
        for family in collector.collect()
        for sample in family.samples
        if "type" in sample.labels and family.name != "workflowd_queue_depth"
    }
    assert gauges == {
        ("workflowd_in_flight_workflows", "limited"): 1, ("workflowd_in_flight_workflows", "waiting"): 0,
        ("workflowd_concurrency_limit", "limited"): 1,
        ("workflowd_rate_limit_starts", "limited"): 5, ("workflowd_rate_limit_period_seconds", "limited"): 60,
        ("workflowd_rate_period_starts", "limited"): 0,
        ("workflowd_due_workflows", "limited"): 2, ("workflowd_due_workflows", "waiting"): 1,
        ("workflowd_throttled_workflows", "limited"): 2, ("workflowd_throttled_workflows", "waiting"): 0,
        ("workflowd_oldest_due_age_seconds", "limited"): gauges[("workflowd_oldest_due_age_seconds", "limited")],
        ("workflowd_oldest_due_age_seconds", "waiting"): gauges[("workflowd_oldest_due_age_seconds", "waiting")],
    }  # fmt: skip
    assert gauges[("workflowd_oldest_due_age_seconds", "waiting")] > 86_400


@pytest.mark.parametrize("table", ["workflow_limits", "workflow_types"])
def test_the_database_holds_a_row_written_by_hand_to_the_engines_bounds(
    db: psycopg.Connection[Any], table: str
) -> None:
    insert = f"INSERT INTO {table} (type, max_concurrency, rate_limit, rate_period_seconds) VALUES (%s, %s, %s, %s)"
    db.execute(insert, ("at_the_bounds", CONCURRENCY_LIMIT_MAX, RATE_LIMIT_MAX, RATE_PERIOD_MAX_SECONDS))
    db.execute(insert, ("at_the_low_bounds", 1, 1, RATE_PERIOD_MIN_SECONDS))
    for n, past in enumerate([
        (CONCURRENCY_LIMIT_MAX + 1, None, None), (0, None, None), (None, RATE_LIMIT_MAX + 1, 1),
        (None, 0, 1), (None, 1, RATE_PERIOD_MAX_SECONDS + 1), (None, 1, RATE_PERIOD_MIN_SECONDS / 2), (None, 1, None),
    ]):  # fmt: skip
        with pytest.raises(psycopg.errors.CheckViolation), db.transaction():
            db.execute(insert, (f"past_{n}", *past))
