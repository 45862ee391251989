"""Real daemon processes against the test's database, and ways to wait for them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from engine import WorkflowRecord, WorkflowService
from tests.daemons import ROOT, Daemon, crash_events, launch
from tests.fakes import Behaviour, fake_ai, fake_chain, serving
from tests.invariants import create_side_tables, illegal_transitions
from tests.replication import ReplicatedPair

# What the e2e tests import from here (ROOT and Daemon live in tests.daemons).
__all__ = [
    "ROOT", "Daemon", "Daemons", "all_finished", "assert_timeline_is_legal", "insert_workflows", "states",
    "wait_until",
]  # fmt: skip
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
class Daemons:
    """Starts `workflowd run` processes; kills whatever is left at the end of the test."""

    db_url: str
    log_dir: Path
    started: list[Daemon] = field(default_factory=list)

    def start(self, env_extra: dict[str, str] | None = None, **settings: Any) -> Daemon:
        defaults = {"log_level": "debug", "lease_seconds": 2, "poll_interval": 0.2}
        log_path = self.log_dir / f"daemon-{len(self.started)}.log"
        daemon = launch(self.db_url, log_path, "tests.e2e.flows", {**defaults, **settings}, env_extra)
        self.started.append(daemon)
        wait_until(lambda: self.registered(daemon), 20, f"daemon {daemon.pid} to register")
        return daemon

    def registered(self, daemon: Daemon) -> bool:
        # A daemon that registered has started, even if a step of the test killed it a
        # moment later (os._exit), as some tests intend; only one that exited without
        # registering failed. The process is polled first, so a registration just before
        # the exit is not missed.
        exited = daemon.process.poll() is not None
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT 1 FROM workflow_workers WHERE pid = %s AND stopped_at IS NULL", (daemon.pid,)
            ).fetchone()
        if row is None and exited:
            pytest.fail(f"daemon exited with {daemon.process.returncode}:\n{daemon.log_path.read_text()}")
        return row is not None

    def all_but(self, *victims: Daemon) -> list[subprocess.Popen[bytes]]:
        """The processes of the daemons a test did not stop on purpose: they must be alive."""
        return [daemon.process for daemon in self.started if daemon not in victims]

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                os.kill(daemon.pid, signal.SIGCONT)
                daemon.process.kill()
            daemon.process.wait(timeout=10)


@pytest.fixture
def daemons(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Daemons]:
    """Daemon processes for the test. At the end, a daemon that logged a `*_crashed` event
    or a critical line fails the test, unless the test declares the event with
    `@pytest.mark.expected_log("claim_crashed")`: a safety net that kept a daemon alive
    through a bug must not turn the bug into a green run. So does a transition in the
    timeline that is not an arrow of the state machines, whatever the test checked."""
    create_side_tables(db)
    running = Daemons(db_url, tmp_path)
    expected = {name for marker in request.node.iter_markers("expected_log") for name in marker.args}
    try:
        yield running
    finally:
        running.stop_all()
    if crashes := crash_events(running.started, expected):
        lines = "\n".join(json.dumps(event)[:2000] for event in crashes[:5])
        pytest.fail(f"daemons logged {len(crashes)} crash or critical lines (first five):\n{lines}")
    if illegal := illegal_transitions(db):
        pytest.fail(f"the timeline holds transitions the state machines do not allow: {illegal[:5]}")


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


def run(
    db_url: str, starts: list[tuple[str, dict[str, Any], str]], timeout: float = 30
) -> list[WorkflowRecord]:
    """Start workflows through the Python API and wait until each is finished."""

    async def scenario() -> list[WorkflowRecord]:
        async with WorkflowService.connect(db_url) as service:
            started = [await service.start_workflow(type, input, user) for type, input, user in starts]
            return [await service.wait_for(workflow.id, timeout=timeout) for workflow in started]

    return asyncio.run(scenario())


def assert_timeline_is_legal(db: psycopg.Connection[Any]) -> None:
    """Every recorded transition is an arrow of the state machines."""
    assert illegal_transitions(db) == []


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    """A primary and a synchronous standby of the test's own."""
    with ReplicatedPair.temporary() as started:
        yield started


@pytest.fixture
def chain_service() -> Iterator[tuple[str, Behaviour]]:
    """A simulated EVM node on loopback: its URL, and what it was asked."""
    behaviour = Behaviour()
    with serving(fake_chain(behaviour)) as url:
        yield url, behaviour


@pytest.fixture
def ai_service() -> Iterator[tuple[str, Behaviour]]:
    """A simulated OpenAI-compatible API on loopback: its base URL, and what it was asked."""
    behaviour = Behaviour()
    with serving(fake_ai(behaviour)) as url:
        yield url + "/v1", behaviour
