"""Retention in the daemons: finished workflows go after their retention, one daemon
pruning at a time, counted in `workflowd_pruned_total`; nothing else is touched."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg

from tests.e2e.conftest import Daemons, insert_workflows, states, wait_until
from tests.e2e.test_http import metric

# About two seconds, in the settings' unit.
RETENTION_DAYS = 2 / 86_400
WORKFLOWS = 60


def test_two_daemons_prune_finished_workflows_once_their_retention_is_over(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    fleet = [
        daemons.start(retention_days=RETENTION_DAYS, failed_retention_days=0, retention_interval=0.3)
        for _ in range(2)
    ]
    insert_workflows(db, "three_steps", WORKFLOWS)
    insert_workflows(db, "permanent", 1)  # fails at once; failed ones are kept for ever here
    # Only a completed workflow is pruned, so this is every one of them run, then pruned.
    wait_until(lambda: states(db) == {"failed": 1}, 40, "the completed workflows to be pruned", 0.2)
    steps, events = db.execute(
        "SELECT (SELECT count(*) FROM workflow_steps), (SELECT count(*) FROM workflow_events)"
    ).fetchone()  # type: ignore[misc]
    assert steps == 1  # the failed workflow's
    assert events > 0
    (finished_seconds,) = db.execute(
        "SELECT extract(epoch FROM now() - completed_at) FROM workflows"
    ).fetchone()  # type: ignore[misc]
    assert finished_seconds > 2  # and the failed one stays, past the others' retention
    pruned = sum(
        metric(
            httpx.get(f"{daemon.url}/metrics", timeout=5).text, "workflowd_pruned_total", state="completed"
        )
        for daemon in fleet
    )
    assert pruned == WORKFLOWS  # each once, whichever daemon pruned it
    assert all(daemon.process.poll() is None for daemon in fleet)
