"""A daemon started before its database waits for it (at boot, during a failover),
alive and unready, saying so to systemd, and serves when the database comes up, in the
same process."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from daemon.local_postgres import LocalPostgres
from tests.daemons import Daemon, crash_events, launch
from tests.e2e.conftest import wait_until
from tests.invariants import create_side_tables

DATABASE_LATE_BY_SECONDS = 30.0


@pytest.fixture
def not_yet_started() -> Iterator[LocalPostgres]:
    """A cluster, initialised but not running."""
    parent = Path(tempfile.mkdtemp(prefix="workflowd-late-"))
    parent.chmod(0o755)  # the unprivileged server user must reach its data folder
    cluster = LocalPostgres(parent / "data", settings={"fsync": "off"})
    cluster.init()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(parent, ignore_errors=True)


def _notifications(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_a_daemon_started_30_s_before_its_database_serves_when_it_comes_up(
    not_yet_started: LocalPostgres, tmp_path: Path
) -> None:
    cluster = not_yet_started
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.setblocking(False)
        daemon: Daemon = launch(
            cluster.url(),
            tmp_path / "daemon.log",
            "tests.e2e.flows",
            {"builtins": "false", "poll_interval": 0.2},
            {"NOTIFY_SOCKET": str(notify_path)},
        )
        try:
            wait_until(lambda: _answers(daemon), 20, "the daemon's HTTP server")
            time.sleep(DATABASE_LATE_BY_SECONDS)
            assert daemon.alive
            assert httpx.get(f"{daemon.url}/livez").status_code == 200
            assert httpx.get(f"{daemon.url}/readyz").status_code == 503
            waiting = _notifications(sock)
            assert waiting
            assert all(m.startswith("STATUS=waiting for the database\n") for m in waiting), waiting
            assert all("EXTEND_TIMEOUT_USEC=" in message for message in waiting)
            attempts = [e for e in daemon.log_events() if e["event"] == "database_unavailable"]
            # One line per attempt, the backoff capped: a few, not hundreds.
            assert 4 <= len(attempts) <= 15, len(attempts)
            assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
            assert max(e["retry_in"] for e in attempts) == 10.0

            cluster.start()
            wait_until(lambda: httpx.get(f"{daemon.url}/readyz").status_code == 200, 30, "ready")
            with psycopg.connect(cluster.url(), autocommit=True) as conn:
                create_side_tables(conn)
                conn.execute("INSERT INTO workflows (type, input) VALUES ('three_steps', '{}')")
                wait_until(
                    lambda: conn.execute("SELECT state::text FROM workflows").fetchone() == ("completed",),
                    30,
                    "the workflow to complete",
                )
            assert "READY=1\nSTATUS=serving" in _notifications(sock)
            assert daemon.alive  # the same process: no restart
            assert crash_events([daemon]) == []
        finally:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


def _answers(daemon: Daemon) -> bool:
    try:
        return httpx.get(f"{daemon.url}/livez", timeout=2).status_code == 200
    except httpx.TransportError:
        assert daemon.alive, daemon.log_path.read_text()
        return False
