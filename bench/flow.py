"""Flow control's cost: the claim of a limited or fair type beside the claim of an
unlimited one (one statement each time, against the several of the limited path), and
drains of a type with a concurrency limit it never reaches, or with fairness, beside
the same drain of an unlimited type."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from bench.daemon import declare, fresh_database, throughput
from bench.flows import noop_1
from bench.limited_flows import noop_fair, noop_limited, noop_rated
from daemon.local_postgres import LocalPostgres
from engine import flow
from engine.definitions import Workflow
from engine.registry import Registry
from engine.sqlfiles import query
from engine.store import StepDefinitions, Store

CLAIM_SAMPLES = 300
CLAIM_BATCH = 10
FAIR_USERS = 100
TYPES = (noop_1, noop_limited, noop_rated, noop_fair)
# What the daemons of a flow-control drain serve: the limited types beside the others.
MODULES = "bench.flows,bench.limited_flows"


def claim_costs(cluster: LocalPostgres, due: int = 10_000) -> dict[str, Any]:
    """Mean time of one claim of CLAIM_BATCH workflows (claimed, then rolled back: the same
    rows every time) of each type of TYPES, with `due` due workflows of each in the table
    (a fair type's shared by FAIR_USERS users)."""
    url = fresh_database(cluster, "bench_flow_claims")
    declare(url, *TYPES)
    with psycopg.connect(url, autocommit=True) as conn:
        for workflow in TYPES:
            conn.execute(
                "INSERT INTO workflows (type, input, user_id) "
                "SELECT %s, jsonb_build_object('n', n), 'user-' || n %% %s FROM generate_series(1, %s) n",
                (workflow.type, FAIR_USERS, due),
            )
        conn.execute("VACUUM ANALYZE")
    costs = asyncio.run(_claim_costs(url))
    unlimited = costs[noop_1.type]
    return {
        "due_per_type": due,
        "batch": CLAIM_BATCH,
        "ms": costs,
        "over_unlimited": {name: round(ms / unlimited, 2) for name, ms in costs.items()},
    }


async def _claim_costs(url: str) -> dict[str, float]:
    registry = Registry(TYPES)
    definitions = StepDefinitions.of(registry)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        store = Store(conn)
        await store.pin_hot_plans()  # as the worker's sessions run it
        limits = await store.load_limits(registry.types)
        await store.provide_slots([noop_limited.type])
        await store.provide_tokens([noop_rated.type])

        async def claim(workflow: Workflow) -> int:
            await conn.execute(query("claiming_transaction"))
            served = registry.served_keys([workflow.type])
            if workflow.type in limits:
                rows = await flow.claim_limited(
                    store, limits={workflow.type: limits[workflow.type]}, worker_id="bench", served=served,
                    busy=[], room=CLAIM_BATCH, lease_seconds=30, definitions=definitions,
                )  # fmt: skip
            else:
                rows = await store.claim_due_workflows(
                    worker_id="bench", served=served, limit=CLAIM_BATCH, lease_seconds=30, busy=[],
                    definitions=definitions,
                )  # fmt: skip
            await conn.execute("ROLLBACK")
            return len(rows)

        costs = {}
        for workflow in TYPES:
            assert await claim(workflow) == CLAIM_BATCH, workflow.type  # and the plans are made
            started = time.perf_counter()
            for _ in range(CLAIM_SAMPLES):
                await claim(workflow)
            costs[workflow.type] = round((time.perf_counter() - started) / CLAIM_SAMPLES * 1000, 3)
        return costs


def limited_drain(
    cluster: LocalPostgres, workflows: int, concurrency: int, workflow: Workflow
) -> dict[str, Any]:
    """Two daemons serving the flow-controlled types too, draining `workflows` one-step
    workflows of `workflow` (a fair one's shared by FAIR_USERS users; of noop_1, the
    cost of serving idle limited types beside a busy unlimited one)."""
    return throughput(
        cluster, 2, workflows, concurrency, 1, workflow=workflow, users=FAIR_USERS, modules=MODULES
    )
