"""Cron schedules against a real database: the CLI manages them; firing starts one
workflow a tick, keyed schedule:{name}:{tick}, moves the cursor with it, and a bad row
(written by hand) is paused without stopping the others."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from engine import Registry, Schedule, WorkflowService
from engine.builtin import builtin_workflows, sandbox_adapters
from engine.schedule_runner import fire_due_schedules
from engine.store import Store
from tests.integration.test_cli import workflowd

EVERY_TWO_SECONDS = "* * * * * */2"


def test_the_cli_adds_lists_pauses_resumes_and_removes_a_schedule(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    env = {"DATABASE_URL": db_url}
    added = workflowd("schedule", "add", "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Paris",
                      "--type", "reward_grant", "--input", '{"amount": 1, "reason": "nightly"}', "--user", "u1",
                      env=env)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("schedule nightly: next tick ")
    (next_fire_at,) = db.execute("SELECT next_fire_at FROM workflow_schedules").fetchone()  # type: ignore[misc]
    paris = next_fire_at.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute) == (2, 30)
    listed = workflowd("schedule", "list", env=env).stdout
    assert "nightly  30 2 * * *  Europe/Paris  reward_grant  yes" in listed
    assert "paused" in workflowd("schedule", "pause", "nightly", env=env).stdout
    assert json.loads(workflowd("schedule", "list", "--json", env=env).stdout)[0]["enabled"] is False
    assert "resumed: next tick" in workflowd("schedule", "resume", "nightly", env=env).stdout
    assert workflowd("schedule", "remove", "nightly", env=env).stdout == "schedule nightly removed\n"
    assert workflowd("schedule", "list", env=env).stdout == "no schedules\n"


def started_by(db: psycopg.Connection[Any], name: str) -> list[str]:
    rows = db.execute(
        "SELECT idempotency_key FROM workflows WHERE idempotency_key LIKE %s ORDER BY 1",
        (f"schedule:{name}:%",),
    ).fetchall()
    return [key for (key,) in rows]


async def test_missed_ticks_fire_all_or_the_latest_once_and_the_cursor_moves_with_them(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    registry = Registry()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        service = WorkflowService(Store(conn), registry)
        await service.add_schedule(Schedule(name="every", cron=EVERY_TWO_SECONDS, type="t", missed="all"))
        await service.add_schedule(Schedule(name="newest", cron=EVERY_TWO_SECONDS, type="t", missed="latest"))
        db.execute("UPDATE workflow_schedules SET next_fire_at = next_fire_at - interval '10 seconds'")
        first = dict(db.execute("SELECT name, next_fire_at FROM workflow_schedules").fetchall())
        fired = {f.name: f for f in await fire_due_schedules(Store(conn), registry, "w1")}
        again = {f.name: f.ticks for f in await fire_due_schedules(Store(conn), registry, "w1")}
    # The cursor moved past now with the starts: a second pass fires nothing fired before,
    # only a tick that fell due in between (every two seconds, on a busy machine).
    assert all(ticks == 1 for ticks in again.values()), again
    every = started_by(db, "every")
    assert fired["every"].ticks + again.get("every", 0) == len(every) >= 5
    ticks = [datetime.fromisoformat(key.removeprefix("schedule:every:")) for key in every]
    assert ticks[0] == first["every"]
    assert all(later - earlier == timedelta(seconds=2) for earlier, later in pairwise(ticks))
    assert fired["newest"].ticks == 1
    assert len(started_by(db, "newest")) == 1 + again.get("newest", 0)
    cursor, by, last = db.execute(
        "SELECT next_fire_at, last_fired_by, last_workflow_id FROM workflow_schedules WHERE name = 'every'"
    ).fetchone()  # type: ignore[misc]
    assert cursor == ticks[-1] + timedelta(seconds=2)
    assert by == "w1"
    assert db.execute("SELECT idempotency_key FROM workflows WHERE id = %s", (last,)).fetchone() == (
        every[-1],
    )


async def test_a_bad_row_is_paused_and_a_refused_tick_skipped_without_stopping_the_others(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    registry = Registry(builtin_workflows(sandbox_adapters(0, 0)))
    db.execute(
        "INSERT INTO workflow_schedules (name, cron, type, next_fire_at, input) VALUES "
        "('broken', 'every full moon', 't', now() - interval '1 second', '{}'), "
        "('invalid', '* * * * *', 'reward_grant', now() - interval '1 second', '{\"amount\": -5}'), "
        "('fine', '* * * * *', 'reward_grant', now() - interval '1 second', '{\"amount\": 5, \"reason\": \"ok\"}')"
    )
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        fired = {f.name: f for f in await fire_due_schedules(Store(conn), registry, "w1")}
    assert fired["broken"].problems[0].startswith("paused: cron expression 'every full moon': ")
    assert "invalid input for workflow type 'reward_grant'" in fired["invalid"].problems[0]
    assert (fired["fine"].ticks, fired["fine"].problems) == (1, ())
    states = dict(
        db.execute("SELECT name, enabled AND next_fire_at > now() FROM workflow_schedules").fetchall()
    )
    assert states == {"broken": False, "invalid": True, "fine": True}
    assert db.execute("SELECT type FROM workflows").fetchall() == [("reward_grant",)]
