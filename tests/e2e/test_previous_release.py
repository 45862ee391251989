"""Migrations expand, so that a fleet can be upgraded one daemon at a time: the previous
release's daemon code (this repository before its newest migration, from git) runs
beside the current one on the current schema, through a kill -9, with nothing lost."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import psycopg

from engine import Registry, WorkflowService
from tests.daemons import ROOT, crash_events, launch
from tests.e2e.conftest import Daemons, all_finished, insert_workflows, wait_until
from tests.e2e.flows import three_steps
from tests.invariants import check_invariants


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def previous_release(into: Path) -> str:
    """Unpack the code as it was before the newest migration into `into`; its revision.

    While the newest migration is not committed yet, that is HEAD. A clone without the
    history fails here, loudly: this test needs it.
    """
    newest = sorted((ROOT / "sql" / "migrations").glob("*.sql"))[-1].relative_to(ROOT)
    added = _git("log", "--diff-filter=A", "--format=%H", "-1", "--", str(newest))
    revision = f"{added}^" if added else "HEAD"
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    assert newest.name not in {path.name for path in (into / "sql" / "migrations").glob("*.sql")}
    return _git("rev-parse", "--short", revision)


async def _start_through_the_api(db_url: str, count: int) -> None:
    async with WorkflowService.connect(db_url, Registry([three_steps])) as service:
        for n in range(count):
            await service.start_workflow("three_steps", {"n": n, "via": "api", "sleep": 0.02}, "deploy")


def test_the_previous_release_runs_beside_this_one_on_this_schema(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str, tmp_path: Path
) -> None:
    old_root = tmp_path / "previous"
    old_root.mkdir()
    revision = previous_release(old_root)

    def start_old() -> Any:
        settings = {"lease_seconds": 2, "poll_interval": 0.2, "builtins": "false"}
        log = tmp_path / f"previous-{len(old)}.log"
        return launch(db_url, log, "tests.e2e.flows", settings, root=old_root)

    old: list[Any] = []
    old.append(start_old())
    new = daemons.start(builtins="false")
    insert_workflows(db, "three_steps", 100, sleep=0.02)  # by SQL: no version
    asyncio.run(_start_through_the_api(db_url, 100))  # version 1, recorded
    wait_until(lambda: db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone()[0] >= 50,  # type: ignore[index]
               60, "the run to get going")  # fmt: skip
    old[0].signal(signal.SIGKILL)
    old[0].process.wait(timeout=10)
    old.append(start_old())
    try:
        wait_until(
            lambda: all_finished(db, 200), 120, f"every workflow to complete beside release {revision}"
        )
        # Both releases completed steps (a worker id holds its process id).
        completers = {
            str(worker_id)
            for (worker_id,) in db.execute(
                "SELECT DISTINCT worker_id FROM workflow_events WHERE to_state = 'completed' AND step_index IS NOT NULL"
            ).fetchall()
        }
        assert any(f"-{new.pid}-" in worker for worker in completers)
        assert any(f"-{daemon.pid}-" in worker for daemon in old for worker in completers)
        invariants = check_invariants(db, expected_completed=200, daemons=[new.process, old[-1].process])
        assert invariants.ok, invariants.problems
        assert crash_events(old) == []
    finally:
        for daemon in old:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
