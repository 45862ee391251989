"""Real daemon processes against the test's database, and ways to wait for them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from daemon.local_postgres import free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


@dataclass
class Daemons:
    """Starts `workflowd run` processes; kills whatever is left at the end of the test."""

    db_url: str
    log_dir: Path
    started: list[Daemon] = field(default_factory=list)

    def start(self, env_extra: dict[str, str] | None = None, **settings: Any) -> Daemon:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.db_url,
            "PYTHONPATH": str(ROOT),
            "WORKFLOWD_MODULES": "tests.e2e.flows",
            "WORKFLOWD_LOG_FORMAT": "json",
            "WORKFLOWD_LOG_LEVEL": "debug",
            "WORKFLOWD_LEASE_SECONDS": "2",
            "WORKFLOWD_POLL_INTERVAL": "0.2",
            "PORT": str(port),
            **(env_extra or {}),
        }
        env.update({f"WORKFLOWD_{name.upper()}": str(value) for name, value in settings.items()})
        log_path = self.log_dir / f"daemon-{len(self.started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        daemon = Daemon(process, log_path, port)
        self.started.append(daemon)
        wait_until(lambda: self.registered(daemon), 20, f"daemon {daemon.pid} to register")
        return daemon

    def registered(self, daemon: Daemon) -> bool:
        if daemon.process.poll() is not None:
            pytest.fail(f"daemon exited with {daemon.process.returncode}:\n{daemon.log_path.read_text()}")
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT 1 FROM workflow_workers WHERE pid = %s AND stopped_at IS NULL", (daemon.pid,)
            ).fetchone()
        return row is not None

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                os.kill(daemon.pid, signal.SIGCONT)
                daemon.process.kill()
            daemon.process.wait(timeout=10)


@pytest.fixture
def daemons(db_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> Iterator[Daemons]:
    db.execute(
        "CREATE TABLE test_effects (workflow_id uuid, step_name text, attempt int, "
        "idempotency_key text, pid int, at timestamptz DEFAULT clock_timestamp())"
    )
    db.execute("CREATE TABLE test_switches (name text PRIMARY KEY)")
    db.execute("CREATE TABLE test_ledger (workflow_id uuid, amount int)")
    running = Daemons(db_url, tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


def insert_workflows(db: psycopg.Connection[Any], type: str, count: int, **input: Any) -> None:
    """One INSERT statement of `count` workflows, as a SQL user would write it."""
    db.execute(
        "INSERT INTO workflows (type, input, user_id) "
        "SELECT %s, %s::jsonb || jsonb_build_object('n', n), 'e2e' FROM generate_series(1, %s) n",
        (type, json.dumps(input), count),
    )


def states(db: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(db.execute("SELECT state::text, count(*) FROM workflows GROUP BY state").fetchall())


def all_finished(db: psycopg.Connection[Any], count: int, state: str = "completed") -> bool:
    return states(db).get(state, 0) == count


def assert_timeline_is_legal(db: psycopg.Connection[Any]) -> None:
    """Every recorded transition is an arrow of the state machines.

    Two self-arrows are bookkeeping, not transitions: running -> running restarts an
    interrupted step, compensating -> compensating records a failed compensation attempt.
    """
    from engine.states import STEP_TRANSITIONS, WORKFLOW_TRANSITIONS, StepState, WorkflowState  # noqa: PLC0415

    for from_state, to_state, step_index in db.execute(
        "SELECT from_state, to_state, step_index FROM workflow_events WHERE from_state IS NOT NULL"
    ).fetchall():
        if step_index is None:
            assert WORKFLOW_TRANSITIONS.can(WorkflowState(from_state), WorkflowState(to_state)), (
                from_state,
                to_state,
            )
        elif from_state != to_state or from_state not in ("running", "compensating"):
            assert STEP_TRANSITIONS.can(StepState(from_state), StepState(to_state)), (from_state, to_state)
