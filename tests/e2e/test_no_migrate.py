"""`workflowd run --no-migrate` (WORKFLOWD_MIGRATE=false): daemons whose database role may
not change the schema serve without migrating, and wait, alive, for a schema that lacks
what their code needs until someone with the rights has run `workflowd migrate`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.daemons import crash_events, launch
from tests.e2e.conftest import all_finished, insert_workflows, wait_until
from tests.integration.test_cli import workflowd
from tests.invariants import create_side_tables

GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
)


@pytest.fixture
def app_role_url(db_url: str, db: psycopg.Connection[Any]) -> Iterator[str]:
    """The test's database, as a role that may read and write rows but change nothing else."""
    role = f"wfd_app_{uuid.uuid4().hex[:8]}"
    create_side_tables(db)
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        for grant in GRANTS:
            db.execute(sql.SQL(grant).format(role=sql.Identifier(role)))
        yield make_conninfo(db_url, user=role)
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_without_ddl_rights_run_refuses_in_one_line_and_run_no_migrate_serves(
    app_role_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    refused = workflowd("run", env={"DATABASE_URL": app_role_url, "WORKFLOWD_MODULES": "tests.e2e.flows"})
    assert refused.returncode == 2
    assert refused.stderr.startswith("workflowd: the database refused: permission denied")
    assert "run --no-migrate" in refused.stderr
    assert "Traceback" not in refused.stderr

    daemon = launch(
        app_role_url,
        tmp_path / "daemon.log",
        "tests.e2e.flows",
        {"builtins": "false"},
        args=("--no-migrate",),
    )
    try:
        insert_workflows(db, "three_steps", 3)
        wait_until(lambda: all_finished(db, 3), 30, "the workflows to complete")
        assert crash_events([daemon]) == []
    finally:
        daemon.process.kill()
        daemon.process.wait(timeout=10)


def test_a_daemon_that_may_not_migrate_waits_for_the_schema(empty_db_url: str, tmp_path: Path) -> None:
    daemon = launch(empty_db_url, tmp_path / "daemon.log", "tests.e2e.flows",
                    {"builtins": "false", "migrate": "false", "poll_interval": 0.2})  # fmt: skip
    try:
        wait_until(
            lambda: any(e["event"] == "schema_behind" for e in daemon.log_events()),
            20,
            "the schema_behind line",
        )
        assert (
            "0001_init.sql" in next(e for e in daemon.log_events() if e["event"] == "schema_behind")["error"]
        )
        assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 503
        assert httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 200

        assert workflowd("migrate", env={"DATABASE_URL": empty_db_url}).returncode == 0
        wait_until(lambda: httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200, 30, "ready")
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            create_side_tables(conn)
            insert_workflows(conn, "three_steps", 1)
            wait_until(lambda: all_finished(conn, 1), 30, "the workflow to complete")
        assert daemon.alive
        assert crash_events([daemon]) == []
    finally:
        daemon.process.kill()
        daemon.process.wait(timeout=10)
