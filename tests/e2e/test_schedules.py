"""Cron schedules with real daemons: each tick starts exactly one workflow whatever the
number of daemons, through kill -9 of the daemon that fired last; a schedule declared in
code is upserted at start; missed ticks follow the schedule's policy."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.e2e.conftest import Daemon, Daemons, wait_until
from tests.e2e.test_http import AUTH, TOKEN

EVERY_TWO_SECONDS = "* * * * * */2"
PREFIX = "/admin/schedules"


def keyed_ticks(db: psycopg.Connection[Any], name: str) -> list[datetime]:
    """The tick of every workflow the schedule started, from its key, in order."""
    rows = db.execute(
        "SELECT idempotency_key FROM workflows WHERE idempotency_key LIKE %s ORDER BY idempotency_key",
        (f"schedule:{name}:%",),
    ).fetchall()
    return [datetime.fromisoformat(key.removeprefix(f"schedule:{name}:")) for (key,) in rows]


def assert_every_tick_once(ticks: list[datetime], seconds: int) -> None:
    assert ticks, "no tick fired"
    gaps = {later - earlier for earlier, later in pairwise(ticks)}
    assert gaps <= {timedelta(seconds=seconds)}, ticks  # none twice, none skipped


def firing_daemon(db: psycopg.Connection[Any], name: str, fleet: list[Daemon]) -> Daemon:
    (worker,) = db.execute("SELECT last_fired_by FROM workflow_schedules WHERE name = %s", (name,)).fetchone()  # type: ignore[misc]
    (daemon,) = [daemon for daemon in fleet if f"-{daemon.pid}-" in worker]
    return daemon


def test_three_daemons_fire_each_tick_once_through_kill_9_of_the_firing_one(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    fleet = [daemons.start(admin_token=TOKEN, schedule_interval=0.2) for _ in range(3)]
    added = httpx.post(
        f"{fleet[0].url}/admin/schedules", headers=AUTH, timeout=10,
        json={"name": "heartbeat", "cron": EVERY_TWO_SECONDS, "type": "three_steps", "input": {"n": 1},
              "missed": "all"},
    )  # fmt: skip
    assert added.status_code == 201, added.text
    wait_until(lambda: len(keyed_ticks(db, "heartbeat")) >= 3, 20, "three ticks")
    victim = firing_daemon(db, "heartbeat", fleet)
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    fired_before = len(keyed_ticks(db, "heartbeat"))
    wait_until(lambda: len(keyed_ticks(db, "heartbeat")) >= fired_before + 3, 20, "three more ticks")
    ticks = keyed_ticks(db, "heartbeat")
    assert_every_tick_once(ticks, 2)
    assert firing_daemon(db, "heartbeat", fleet) is not victim  # a survivor fires now
    # Each tick's workflow runs (with the survivors).
    wait_until(
        lambda: db.execute("SELECT count(*) FILTER (WHERE state <> 'completed') FROM workflows "
                           "WHERE idempotency_key LIKE 'schedule:heartbeat:%%' AND created_at < now() - interval '5 seconds'")
        .fetchone() == (0,), 20, "the ticks' workflows to complete",
    )  # fmt: skip
    assert all(daemon.process.poll() is None for daemon in fleet if daemon is not victim)


def test_a_schedule_declared_in_code_is_upserted_and_missed_ticks_follow_its_policy(
    daemons: Daemons, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    module = tmp_path / "nightly.py"
    module.write_text(
        "from engine import Schedule\n"
        f"often = Schedule(name='often', cron='{EVERY_TWO_SECONDS}', type='three_steps', input={{'n': 2}})\n"
        f"catch_up = Schedule(name='catch_up', cron='{EVERY_TWO_SECONDS}', type='three_steps', missed='all')\n"
    )
    daemon = daemons.start(modules=f"tests.e2e.flows,{module}", schedule_interval=0.2)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM workflow_schedules").fetchone() == (2,), 10, "declared"
    )
    declared = dict(db.execute("SELECT name, declared FROM workflow_schedules").fetchall())
    assert declared == {"often": True, "catch_up": True}
    # Every daemon down for 10 s: `latest` fires the newest missed tick once, `all` each.
    daemon.process.send_signal(signal.SIGTERM)
    daemon.process.wait(timeout=30)
    db.execute("UPDATE workflow_schedules SET next_fire_at = next_fire_at - interval '10 seconds'")
    before = {name: len(keyed_ticks(db, name)) for name in ("often", "catch_up")}
    started = time.monotonic()
    daemons.start(modules=f"tests.e2e.flows,{module}", schedule_interval=0.2)
    wait_until(lambda: len(keyed_ticks(db, "catch_up")) >= before["catch_up"] + 5, 20, "the missed ticks")
    assert time.monotonic() - started < 8  # caught up at once, not tick by tick
    assert_every_tick_once(keyed_ticks(db, "catch_up"), 2)
    often = keyed_ticks(db, "often")
    assert len(often) <= before["often"] + 2  # the newest missed tick, maybe the one after


def test_the_admin_api_manages_schedules_and_refuses_bad_ones_in_one_line(daemons: Daemons) -> None:
    daemon = daemons.start(admin_token=TOKEN)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as api:
        body = {
            "name": "weekly",
            "cron": "0 9 * * mon",
            "timezone": "America/New_York",
            "type": "three_steps",
        }
        assert (
            api.post(PREFIX, json=body).json()["next_fire_at"].endswith(("-05:00", "-04:00", "Z", "+00:00"))
        )
        assert [s["name"] for s in api.get(PREFIX).json()] == ["weekly"]
        assert api.post(f"{PREFIX}/weekly/pause").json()["enabled"] is False
        assert api.post(f"{PREFIX}/weekly/resume").json()["enabled"] is True
        assert api.delete(f"{PREFIX}/weekly").status_code == 204
        missing = api.delete(f"{PREFIX}/weekly")
        assert (missing.status_code, missing.json()["detail"]) == (404, "no schedule named 'weekly'")
        for bad, message in (
            ({"cron": "61 * * * *"}, "cron expression '61 * * * *' is not valid"),
            ({"timezone": "Mars/Base"}, "unknown time zone 'Mars/Base'"),
            ({"type": "nobody_serves_this"}, "no live worker serves workflow type 'nobody_serves_this'"),
        ):
            refused = api.post(PREFIX, json=body | bad)
            assert refused.status_code == 422, bad
            assert refused.json()["detail"].startswith(message) or message in refused.json()["detail"]
