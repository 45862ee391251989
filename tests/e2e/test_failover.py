"""Failover: a primary with a synchronous standby, two daemons on a multi-host URL, the
primary stopped mid-run (fast, then as a crash) and the standby promoted.

Afterwards every workflow is terminal and completed, nothing was committed twice, each
transactional write happened once, no step that must not run twice ran twice, and the
daemons never exited. Steps record their effects in a database of their own (the test's
database on the test server), which plays the world outside the engine and stays up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import migrate_url
from tests.daemons import crash_events
from tests.e2e.conftest import Daemons, wait_until
from tests.integration.test_cli import workflowd
from tests.invariants import check_invariants, create_side_tables
from tests.replication import ReplicatedPair

TOKEN = "failover-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Slow steps, so that the failover comes in the middle of the run.
STEP_SLEEP_SECONDS = 0.05
WORKFLOWS = {"three_steps": 300, "ledger_in_three": 100, "payout_in_three": 100}
FAILOVER_AFTER_COMPLETED = 100
# Between the primary's end and the promotion: a failover manager's detection time
# (Patroni's default TTL is 30 s), longer than the daemons' lease.
PRIMARY_GONE_SECONDS = 15.0
# A failover must not leave the fleet waiting on reconnection backoff: the first claim
# on the new primary comes within seconds of its promotion (psycopg_pool's own backoff,
# doubling up to 5 minutes, took 14 s here after a 15 s outage, and more after longer ones).
FIRST_CLAIM_WITHIN_SECONDS = 5.0


def _count(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _completed(url: str) -> int:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            return _count(conn, "SELECT count(*) FROM workflows WHERE state = 'completed'")
    except psycopg.OperationalError:
        return 0


def _stage(url: str) -> None:
    asyncio.run(migrate_url(url))
    with psycopg.connect(url, autocommit=True) as conn:
        create_side_tables(conn)
        for type, count in WORKFLOWS.items():
            conn.execute(
                "INSERT INTO workflows (type, input, user_id) "
                "SELECT %s, jsonb_build_object('n', n, 'amount', 1, 'sleep', %s::float8), 'failover' "
                "FROM generate_series(1, %s) n",
                (type, STEP_SLEEP_SECONDS, count),
            )


def _copy_effects(effects: psycopg.Connection[Any], target: psycopg.Connection[Any]) -> None:
    """The effects, beside the engine's rows, for the invariants that join the two."""
    rows = effects.execute(
        "SELECT workflow_id, step_name, attempt, idempotency_key, pid, at FROM test_effects"
    ).fetchall()
    with target.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO test_effects (workflow_id, step_name, attempt, idempotency_key, pid, at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            rows,
        )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_promoted_standby_takes_over_with_nothing_lost(
    mode: str, pair: ReplicatedPair, db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    url = pair.url()
    _stage(url)
    create_side_tables(db)
    fleet = Daemons(url, tmp_path)
    try:
        for _ in range(2):
            fleet.start(
                env_extra={"TEST_EFFECTS_URL": db_url}, lease_seconds=10, poll_interval=1, admin_token=TOKEN
            )
        wait_until(lambda: _completed(url) >= FAILOVER_AFTER_COMPLETED, 60, "the run to get going")

        pair.primary.stop_now(mode)
        time.sleep(PRIMARY_GONE_SECONDS)
        pair.standby.promote()
        promoted_at = time.time()

        total = sum(WORKFLOWS.values())
        wait_until(
            lambda: _completed(url) == total, 120, "every workflow to complete on the new primary", 0.5
        )
        # The CLI and the admin API find the new primary through the same URL.
        started = workflowd("start", "three_steps", "--user", "cli", "--input", "{}", "--json",
                            env={"DATABASE_URL": url, "WORKFLOWD_MODULES": "tests.e2e.flows"})  # fmt: skip
        assert started.returncode == 0, started.stderr
        total += 1
        wait_until(lambda: _completed(url) == total, 30, "the CLI's workflow to complete", 0.2)
        listed = httpx.get(f"{fleet.started[0].url}/admin/workflows", headers=AUTH, timeout=10)
        assert listed.json()["total"] == total
        with psycopg.connect(pair.standby.url(), autocommit=True) as new_primary:
            _copy_effects(db, new_primary)
            invariants = check_invariants(new_primary, expected_completed=total, daemons=fleet.all_but())
            ran_twice = _count(
                new_primary,
                "SELECT count(*) FROM (SELECT 1 FROM test_effects WHERE step_name = 'send' "
                "GROUP BY workflow_id HAVING count(*) > 1) twice",
            )
            ledger_rows = _count(new_primary, "SELECT count(*) FROM test_ledger")
            first_claim = new_primary.execute(
                "SELECT extract(epoch FROM min(at)) FROM workflow_events "
                "WHERE step_index IS NULL AND from_state = 'pending' AND to_state = 'running' "
                "AND at >= to_timestamp(%s)",
                (promoted_at,),
            ).fetchone()
    finally:
        fleet.stop_all()

    assert crash_events(fleet.started) == []
    assert invariants.ok, invariants.problems
    assert ran_twice == 0  # the step that must not run twice ran once per workflow
    assert ledger_rows == WORKFLOWS["ledger_in_three"]  # each transactional write, exactly once
    assert first_claim is not None
    assert first_claim[0] is not None, "no claim on the new primary"
    seconds = float(first_claim[0]) - promoted_at
    print(f"failover ({mode}): first claim on the new primary {seconds:.2f} s after its promotion")
    assert seconds < FIRST_CLAIM_WITHIN_SECONDS
