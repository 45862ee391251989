"""What the fault scenarios stand on: a PostgreSQL cluster of the suite's own (so that it
may restart it), a database per scenario, and a fleet of daemon processes that a
supervisor keeps at strength while the scenario kills them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import FAST_UNSAFE_SETTINGS, create_database, migrate_url
from tests.daemons import Daemon, launch
from tests.invariants import create_side_tables
from tests.replication import Server

# fsync off is safe here: the suite kills processes, never the machine, and the kernel
# keeps what was written. synchronous_commit stays on, or an immediate restart would
# lose commits the daemons were told had happened (a fault of the setup, not of theirs).
CHAOS_SETTINGS = {**FAST_UNSAFE_SETTINGS, "synchronous_commit": "on", "max_connections": "300"}
TEMPLATE = "chaos_template"
REGISTER_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


class ChaosPostgres(Server):
    """A LocalPostgres that can also be restarted the hard ways."""

    def restart(self, mode: str) -> None:
        """`fast` rolls back open transactions and checkpoints; `immediate` kills every
        backend at once and the next start recovers from the WAL, as after a crash."""
        self.stop_now(mode)
        self.start()

    def prepare_template(self) -> None:
        """Migrate the schema once into a template database that scenarios clone."""
        asyncio.run(migrate_url(create_database(self.url(), TEMPLATE)))

    def scenario_database(self, name: str) -> str:
        """A fresh migrated database for one scenario, with the tests' side tables."""
        url = create_database(self.url(), name, template=TEMPLATE)
        with psycopg.connect(url, autocommit=True) as conn:
            create_side_tables(conn)
        return url


class Database:
    """The scenario's database as the controller sees it: every call opens its own
    connection and retries while the server is away (a scenario restarts it)."""

    def __init__(self, url: str, patience_seconds: float = 30.0) -> None:
        self.url = url
        self.patience_seconds = patience_seconds

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + self.patience_seconds
        while True:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    cursor = conn.execute(query, params)
                    return cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def value(self, query: str, params: Any = None) -> Any:
        return self.rows(query, params)[0][0]

    def execute(self, query: str, params: Any = None) -> None:
        self.rows(query, params)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """One plain connection, for the checks at the end (the server is up by then)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            yield conn

    def insert(self, type: str, count: int, **input: Any) -> int:
        """One INSERT statement of `count` workflows, as a SQL user would write it; returns
        `count`. Each call is a batch of its own keys, so a retry after a connection drop
        (the first try may have committed) never starts a workflow twice."""
        batch = {**input, "batch": uuid.uuid4().hex}
        self.execute(
            "INSERT INTO workflows (type, input, user_id) "
            "SELECT %s, %s::jsonb || jsonb_build_object('n', n), 'chaos' FROM generate_series(1, %s) n "
            "ON CONFLICT (idempotency_key) DO NOTHING",
            (type, json.dumps(batch), count),
        )
        return count

    def unfinished(self) -> int:
        return int(
            self.value("SELECT count(*) FROM workflows WHERE state IN ('pending', 'running', 'compensating')")
        )

    def wait_until_finished(self, timeout: float) -> bool:
        """Until every workflow is in a final state; False after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.unfinished():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


@dataclass
class Fleet:
    """`count` daemon slots on one database; `supervise()` refills a slot whose daemon died."""

    db_url: str
    log_dir: Path
    count: int
    settings: Mapping[str, Any]
    env_extra: Mapping[str, str] = field(default_factory=dict)
    # Every daemon this fleet ever started, for the crash check of their logs.
    started: list[Daemon] = field(default_factory=list)
    slots: list[Daemon] = field(default_factory=list)
    restarts: int = 0

    def start(self) -> Fleet:
        self.slots = [self._launch() for _ in range(self.count)]
        self.wait_registered(self.slots)
        return self

    def _launch(self, env_extra: Mapping[str, str] | None = None) -> Daemon:
        log_path = self.log_dir / f"daemon-{len(self.started)}.log"
        daemon = launch(
            self.db_url, log_path, "tests.chaos.flows", self.settings, env_extra or self.env_extra
        )
        self.started.append(daemon)
        return daemon

    def add(self, env_extra: Mapping[str, str]) -> Daemon:
        """One more daemon beyond the slots' settings (another route to the database, say)."""
        daemon = self._launch(env_extra)
        self.slots.append(daemon)
        self.wait_registered([daemon])
        return daemon

    def wait_registered(self, daemons: list[Daemon]) -> None:
        """Until every one of `daemons` is registered; a daemon that dies meanwhile is an error."""
        deadline = time.monotonic() + REGISTER_TIMEOUT_SECONDS
        while not self._registered(daemons):
            if dead := [daemon for daemon in daemons if not daemon.alive]:
                raise RuntimeError(f"a daemon exited at start; its log: {dead[0].log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemons did not register within {REGISTER_TIMEOUT_SECONDS} s")
            time.sleep(0.05)

    def _registered(self, daemons: list[Daemon]) -> bool:
        # A daemon killed with -9 leaves its row behind: alive is part of registered.
        if not all(daemon.alive for daemon in daemons):
            return False
        pids = [daemon.pid for daemon in daemons]
        registered = Database(self.db_url).value(
            "SELECT count(*) FROM workflow_workers WHERE pid = ANY(%s) AND stopped_at IS NULL", (pids,)
        )
        return bool(registered == len(pids))

    def kill(self, daemon: Daemon) -> None:
        """kill -9, and reap it, so that its slot reads as dead at once."""
        daemon.signal(signal.SIGKILL)
        daemon.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def alive(self) -> list[Daemon]:
        return [daemon for daemon in self.slots if daemon.alive]

    def refill(self) -> int:
        """Replace each dead daemon of the slots by a new one, as systemd's Restart= would;
        returns how many."""
        replaced = 0
        for index, daemon in enumerate(self.slots):
            if not daemon.alive:
                self.slots[index] = self._launch()
                replaced += 1
        self.restarts += replaced
        return replaced

    def settle(self) -> None:
        """Refill the slots until every daemon is up (a victim of a moment ago may not be
        reaped yet): what follows judges the daemons' own health, not the last victim's."""
        deadline = time.monotonic() + REGISTER_TIMEOUT_SECONDS
        while self.refill() or not self._registered(self.slots):
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemons did not register within {REGISTER_TIMEOUT_SECONDS} s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def supervise(self, interval: float = 0.1) -> Iterator[Fleet]:
        """A supervisor thread that refills the slots until the block ends, then settles."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(interval):
                self.refill()

        supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        supervisor.start()
        try:
            yield self
        finally:
            done.set()
            supervisor.join()
        self.settle()

    def stop(self) -> None:
        """SIGTERM every live daemon (after SIGCONT, in case one is stopped); kill laggards."""
        for daemon in self.started:
            if daemon.alive:
                daemon.signal(signal.SIGCONT)
                daemon.signal(signal.SIGTERM)
        for daemon in self.started:
            try:
                daemon.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait(timeout=STOP_TIMEOUT_SECONDS)
