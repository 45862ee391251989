"""WORKFLOWD_READ_DATABASE_URL: the admin API's lists, search and stats read from a
replica, so that dashboards never load the primary, and /healthz shows its lag."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.conftest import migrate_url
from tests.daemons import crash_events
from tests.e2e.conftest import Daemons, insert_workflows, wait_until
from tests.invariants import create_side_tables
from tests.replication import ReplicatedPair

TOKEN = "replica-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_POOL = "workflowd-api-reads"


def _application_names(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE datname = 'postgres'")
        return {str(name) for (name,) in rows.fetchall()}


def test_lists_search_and_stats_read_from_the_replica(pair: ReplicatedPair, tmp_path: Path) -> None:
    primary, replica = pair.primary.url(), pair.standby.url()
    asyncio.run(migrate_url(primary))
    with psycopg.connect(primary, autocommit=True) as db:
        create_side_tables(db)
        fleet = Daemons(primary, tmp_path)
        try:
            daemon = fleet.start(admin_token=TOKEN, read_database_url=replica)
            insert_workflows(db, "three_steps", 5)
            url = f"{daemon.url}/admin/workflows"

            def listed_completed() -> Any:
                answer = httpx.get(url, params={"state": "completed"}, headers=AUTH, timeout=10)
                return answer.status_code == 200 and answer.json()["total"] == 5

            wait_until(listed_completed, 30, "the replica to list the completed workflows")
            stats = httpx.get(f"{url}/stats/overview", headers=AUTH, timeout=10)
            assert stats.status_code == 200
            (workflow_id,) = db.execute("SELECT id FROM workflows LIMIT 1").fetchone()  # type: ignore[misc]
            found = httpx.get(f"{url}/search", params={"q": str(workflow_id)}, headers=AUTH, timeout=10)
            assert [w["id"] for w in found.json()] == [str(workflow_id)]
            # The reads' pool is on the replica, and only there.
            assert READ_POOL in _application_names(replica)
            assert READ_POOL not in _application_names(primary)
            health = httpx.get(f"{daemon.url}/healthz", timeout=10).json()
            assert health["status"] == "ready"
            assert health["read_replica"]["reachable"] is True
            assert 0 <= health["read_replica"]["lag_seconds"] < 5
        finally:
            fleet.stop_all()
    assert crash_events(fleet.started) == []


def test_without_a_replica_health_says_nothing_of_one(daemons: Daemons) -> None:
    daemon = daemons.start()
    assert "read_replica" not in httpx.get(f"{daemon.url}/healthz", timeout=10).json()
