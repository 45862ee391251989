"""Definition versions across a rolling upgrade: an old daemon (version 1 of a type) and a
new one (versions 1 and 2: a step renamed, one inserted) run side by side, killed with
-9 in turn, and every workflow runs to its end under the version it started with. A
version no live daemon serves waits, visible, and finishes once a daemon serves it."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import httpx
import psycopg

from tests.e2e.conftest import Daemons, all_finished, states, wait_until
from tests.e2e.versions_v1 import versioned_v1
from tests.e2e.versions_v2 import versioned_v2
from tests.integration.test_cli import workflowd
from tests.invariants import check_invariants

OLD = "tests.e2e.versions_v1"
NEW = "tests.e2e.versions_v1,tests.e2e.versions_v2"
NEXT = "tests.e2e.versions_v2"
FIX = "tests.e2e.versions_v3"
STEPS = {1: [s.name for s in versioned_v1.steps], 2: [s.name for s in versioned_v2.steps]}
TOKEN = "versions-token-" + uuid.uuid4().hex

# Step rows, or executions, of a name that is not a step of the workflow's version.
WRONG_STEPS = """
SELECT (SELECT count(*) FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id
        WHERE NOT s.step_name = ANY(CASE w.version WHEN 1 THEN %(v1)s::text[] ELSE %(v2)s::text[] END))
     + (SELECT count(*) FROM test_effects f JOIN workflows w ON w.id = f.workflow_id
        WHERE NOT f.step_name = ANY(CASE w.version WHEN 1 THEN %(v1)s::text[] ELSE %(v2)s::text[] END))
"""


def start(db: psycopg.Connection[Any], version: int | None, count: int, sleep: float = 0.0) -> None:
    """`count` workflows of `versioned`, by SQL, at `version` (None: the claimer chooses)."""
    db.execute(
        "INSERT INTO workflows (type, version, input, user_id) "
        "SELECT 'versioned', %s, jsonb_build_object('n', n, 'v', %s::int, 'sleep', %s::float8), 'deploy' "
        "FROM generate_series(1, %s) n",
        (version, version, sleep, count),
    )


def completed_under(db: psycopg.Connection[Any]) -> dict[int, int]:
    rows = db.execute("SELECT version, count(*) FROM workflows WHERE state = 'completed' GROUP BY 1")
    return {int(version): int(count) for version, count in rows.fetchall()}


def test_old_and_new_daemons_each_run_only_their_versions_through_kill_9(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    old = daemons.start(modules=OLD, builtins="false")
    new = daemons.start(modules=NEW, builtins="false")
    start(db, 1, 100, sleep=0.02)
    start(db, 2, 100, sleep=0.02)
    wait_until(lambda: sum(completed_under(db).values()) >= 40, 60, "the run to get going")
    old.signal(signal.SIGKILL)
    old.process.wait(timeout=10)
    old = daemons.start(modules=OLD, builtins="false")
    wait_until(lambda: sum(completed_under(db).values()) >= 120, 60, "the run to go on")
    new.signal(signal.SIGKILL)
    new.process.wait(timeout=10)
    new = daemons.start(modules=NEW, builtins="false")

    wait_until(lambda: all_finished(db, 200), 120, "every workflow to complete")
    assert completed_under(db) == {1: 100, 2: 100}
    # Each ran its own version's steps, and only them, whatever daemon claimed it.
    wrong = db.execute(WRONG_STEPS, {"v1": STEPS[1], "v2": STEPS[2]}).fetchone()
    assert wrong == (0,)
    assert db.execute("SELECT count(*) FROM workflows WHERE (input->>'v')::int <> version").fetchone() == (0,)
    invariants = check_invariants(db, expected_completed=200, daemons=[old.process, new.process])
    assert invariants.ok, invariants.problems


def test_a_retired_version_waits_visibly_until_a_daemon_serves_it_again(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    old = daemons.start(modules=OLD, builtins="false")
    # The release after the deploy serves version 2 only.
    retired = daemons.start(modules=NEXT, builtins="false", admin_token=TOKEN, queue_depth_interval=0.5)
    start(db, 1, 5, sleep=2)
    start(db, 2, 5)
    wait_until(lambda: _first_steps_started(db) >= 5, 30, "version 1 workflows to be under way")
    # The last daemon with version 1 goes: the steps it runs finish, the next ones wait.
    old.signal(signal.SIGTERM)
    assert old.process.wait(timeout=30) == 0
    start(db, None, 5)  # by SQL without a version: the newest version its claimer serves
    wait_until(lambda: completed_under(db) == {2: 10}, 30, "the served versions to complete")
    in_flight = 5
    assert _first_steps_done(db) == in_flight  # mid-way: neither failed nor run by version 2
    assert states(db) == {"completed": 10, "running": in_flight}

    stats = httpx.get(
        f"{retired.url}/admin/workflows/stats/overview",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    ).json()
    assert stats["unserved_types"] == ["versioned@1"]
    gauge = f'workflowd_unserved_workflows{{served="versioned@1"}} {float(in_flight)}'
    wait_until(lambda: gauge in httpx.get(f"{retired.url}/metrics").text, 10, "the unserved gauge")
    versions = workflowd("versions", env={"DATABASE_URL": db_url})
    assert versions.returncode == 0, versions.stderr
    lines = [line.split() for line in versions.stdout.splitlines()]
    assert ["versioned", "1", str(in_flight), str(5 - in_flight), "0"] in lines
    assert "waiting for a daemon that serves them: versioned v1" in versions.stdout

    daemons.start(modules=OLD, builtins="false")  # a daemon that still has version 1
    wait_until(lambda: all_finished(db, 15), 30, "the waiting workflows to finish")
    assert completed_under(db) == {1: 5, 2: 10}
    assert db.execute(WRONG_STEPS, {"v1": STEPS[1], "v2": STEPS[2]}).fetchone() == (0,)


def _first_steps_started(db: psycopg.Connection[Any], version: int = 1) -> int:
    row = db.execute(
        "SELECT count(*) FROM test_effects f JOIN workflows w ON w.id = f.workflow_id "
        "WHERE w.version = %s AND f.step_name = 'reserve'",
        (version,),
    ).fetchone()
    return int(row[0]) if row else 0


def _first_steps_done(db: psycopg.Connection[Any]) -> int:
    row = db.execute(
        "SELECT count(*) FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id "
        "WHERE w.version = 1 AND s.step_name = 'reserve' AND s.state = 'completed'"
    ).fetchone()
    return int(row[0]) if row else 0


def test_workflows_in_flight_move_to_a_version_whose_steps_line_up(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    current = daemons.start(modules=NEXT, builtins="false")
    start(db, 2, 5, sleep=2)
    wait_until(lambda: _first_steps_started(db, 2) >= 5, 30, "version 2 workflows to be under way")
    current.signal(signal.SIGTERM)  # its steps finish; the workflows wait at their next step
    assert current.process.wait(timeout=30) == 0

    env = {"DATABASE_URL": db_url, "WORKFLOWD_BUILTINS": "false"}
    refused = workflowd("migrate-version", "versioned", "--from", "1", "--to", "2",
                        env=env | {"WORKFLOWD_MODULES": NEW})  # fmt: skip
    assert refused.returncode == 1
    assert "its workflows in flight cannot move; let them finish under version 1" in refused.stderr
    moved = workflowd("migrate-version", "versioned", "--from", "2", "--to", "3",
                      env=env | {"WORKFLOWD_MODULES": f"{NEXT},{FIX}"})  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == "moved 5 workflows of versioned from version 2 to 3"

    daemons.start(modules=FIX, builtins="false")  # serves version 3 only
    wait_until(lambda: all_finished(db, 5), 30, "the moved workflows to finish under version 3")
    assert completed_under(db) == {3: 5}
    fixed = db.execute("SELECT count(*) FROM workflows WHERE output->>'fixed' = 'true'").fetchone()
    assert fixed == (5,)
