"""Delayed starts from every way in (HTTP, CLI, Python, SQL): pending and unclaimed until
their time by the database's clock, then run like any other; a duplicate start keeps the
first one's time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg

from engine import WorkflowService
from tests.e2e.conftest import ROOT, Daemons, wait_until
from tests.e2e.test_http import AUTH, TOKEN

DELAY_SECONDS = 3.0


def database_now(db: psycopg.Connection[Any]) -> datetime:
    (now,) = db.execute("SELECT clock_timestamp()").fetchone()  # type: ignore[misc]
    return now  # type: ignore[no-any-return]


def start_from_python(db_url: str, start_at: datetime) -> str:
    async def start() -> str:
        async with WorkflowService.connect(db_url) as service:
            workflow = await service.start_workflow("three_steps", {"by": "python"}, "u1", start_at=start_at)
            return str(workflow.id)

    return asyncio.run(start())


def test_a_delayed_workflow_is_not_claimed_before_its_time(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start(admin_token=TOKEN)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as api:
        check_delayed_starts(api, db_url, db)


def check_delayed_starts(api: httpx.Client, db_url: str, db: psycopg.Connection[Any]) -> None:
    now = database_now(db)
    by_http = api.post("/admin/workflows", json={"type": "three_steps", "input": {"by": "http"},
                                                 "delay_seconds": DELAY_SECONDS}).json()  # fmt: skip
    by_cli = subprocess.run(
        [sys.executable, "-m", "daemon", "start", "three_steps", "--user", "u1", "--input", '{"by": "cli"}',
         "--delay", str(DELAY_SECONDS), "--json"],
        env={**os.environ, "DATABASE_URL": db_url}, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    by_python = start_from_python(db_url, now + timedelta(seconds=DELAY_SECONDS))
    (by_sql,) = db.execute(
        "INSERT INTO workflows (type, input, next_retry_at) "
        "VALUES ('three_steps', '{\"by\": \"sql\"}', now() + interval '3 seconds') RETURNING id::text"
    ).fetchone()  # type: ignore[misc]
    delayed = [by_http["id"], json.loads(by_cli.stdout)["id"], by_python, by_sql]
    due = dict(db.execute("SELECT id::text, next_retry_at FROM workflows").fetchall())
    assert all(due[id] >= now + timedelta(seconds=DELAY_SECONDS) for id in delayed), due
    # An immediate start meanwhile runs at once: the daemon is awake, the others wait.
    right_away = api.post("/admin/workflows", json={"type": "three_steps", "input": {"by": "now"}}).json()
    wait_until(lambda: state(db, right_away["id"]) == "completed", 10, "the immediate workflow")
    assert {state(db, id) for id in delayed} == {"pending"}
    assert db.execute("SELECT count(*) FROM workflow_events WHERE workflow_id = ANY(%s::uuid[])",
                      (delayed,)).fetchone() == (0,)  # fmt: skip
    wait_until(lambda: {state(db, id) for id in delayed} == {"completed"}, 20, "the delayed workflows", 0.2)
    started = dict(db.execute("SELECT id::text, started_at FROM workflows").fetchall())
    assert all(started[id] >= due[id] for id in delayed), (started, due)
    assert all(started[id] < due[id] + timedelta(seconds=3) for id in delayed), (started, due)


def state(db: psycopg.Connection[Any], workflow_id: str) -> str:
    (found,) = db.execute("SELECT state::text FROM workflows WHERE id = %s", (workflow_id,)).fetchone()  # type: ignore[misc]
    return str(found)


def test_a_duplicate_delayed_start_keeps_the_first_time_and_bad_times_are_refused(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start(admin_token=TOKEN)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as api:
        check_duplicates_and_bad_times(api, db)


def check_duplicates_and_bad_times(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    later = (datetime.now().astimezone() + timedelta(hours=1)).isoformat()
    body = {"type": "three_steps", "input": {"n": 1}, "user_id": "u1", "start_at": later}
    first = api.post("/admin/workflows", json=body)
    again = api.post("/admin/workflows", json=body | {"start_at": None, "delay_seconds": 5})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["next_retry_at"] == first.json()["next_retry_at"]
    assert datetime.fromisoformat(first.json()["next_retry_at"]) == datetime.fromisoformat(later)
    for bad in ({"start_at": "2026-12-01T09:00:00"}, {"delay_seconds": -1}, {"start_at": later, "delay_seconds": 1},
                {"start_at": "tomorrow"}, {"delay_seconds": 3.0457e136}):  # fmt: skip
        refused = api.post("/admin/workflows", json={"type": "three_steps", "input": {"n": 2}} | bad)
        assert refused.status_code == 422, bad
    both = api.post("/admin/workflows", json={"type": "three_steps", "start_at": later, "delay_seconds": 1})
    assert both.json()["detail"] == "give a start time or a delay, not both"
    time.sleep(0.5)
    assert db.execute("SELECT count(*), min(state::text) FROM workflows").fetchone() == (1, "pending")
