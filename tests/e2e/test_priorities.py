"""Priorities with real daemons: an urgent workflow inserted behind 10,000 due bulk ones
is claimed at once, by the priority its definition declares (a SQL insert names none)."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.e2e.conftest import Daemons, insert_workflows, wait_until

BULK = 10_000
CONCURRENCY = 10
POLL_SECONDS = 0.2


def test_an_urgent_workflow_behind_ten_thousand_bulk_ones_is_claimed_within_one_poll(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    for _ in range(3):
        daemons.start(concurrency=CONCURRENCY, poll_interval=POLL_SECONDS)
    insert_workflows(db, "bulk_reindex", BULK, sleep=0.05)
    wait_until(lambda: done(db, "bulk_reindex") >= 100, 60, "the fleet to be busy with bulk work")

    insert_workflows(db, "urgent_trade", 1)
    wait_until(lambda: done(db, "urgent_trade") == 1, 10, "the urgent workflow")
    priority, pickup, created, started = db.execute(
        "SELECT priority, extract(epoch FROM started_at - created_at), created_at, started_at "
        "FROM workflows WHERE type = 'urgent_trade'"
    ).fetchone()  # type: ignore[misc]
    assert priority == -50  # its definition's, declared by the daemons
    assert pickup < POLL_SECONDS, pickup
    (claimed_meanwhile,) = db.execute(
        "SELECT count(*) FROM workflows WHERE type = 'bulk_reindex' AND started_at > %s AND started_at < %s",
        (created, started),
    ).fetchone()  # type: ignore[misc]
    assert claimed_meanwhile <= 3 * CONCURRENCY  # at most one claim batch of each daemon
    (still_due,) = db.execute("SELECT count(*) FROM workflows WHERE state = 'pending'").fetchone()  # type: ignore[misc]
    assert still_due > BULK / 2


def done(db: psycopg.Connection[Any], workflow_type: str) -> int:
    (count,) = db.execute(
        "SELECT count(*) FROM workflows WHERE type = %s AND state = 'completed'", (workflow_type,)
    ).fetchone()  # type: ignore[misc]
    return int(count)
