"""A primary and a streaming standby from the machine's PostgreSQL binaries, for the
failover tests: initdb, pg_basebackup, primary_conninfo, and a promotion.

The standby is synchronous (the primary's commits wait for its flush) unless asked
otherwise, as a production pair under Patroni or pg_auto_failover runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from daemon.local_postgres import SUPERUSER, LocalPostgres, free_port

STANDBY_NAME = "standby"
REPLICATION_TIMEOUT_SECONDS = 30.0
SERVER_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "hot_standby": "on",
    "max_connections": "200",
    # Nothing here survives the test: durability to disk buys nothing but time.
    "fsync": "off",
    "full_page_writes": "off",
}


class Server(LocalPostgres):
    """LocalPostgres with what a replicated pair needs: a base backup, a hard stop, a
    promotion."""

    def clone_from(self, primary: Server) -> None:
        """Make this data folder a standby of `primary` (pg_basebackup -R)."""
        self.data_dir.mkdir(parents=True, mode=0o700)
        if self._user:  # the server's user must own its data folder
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "pg_basebackup",
            "-h", "127.0.0.1", "-p", str(primary.port), "-U", SUPERUSER,
            "-D", str(self.data_dir), "-X", "stream", "--checkpoint=fast", "-R",
            "-d", f"application_name={STANDBY_NAME}",
        )  # fmt: skip

    def stop_now(self, mode: str) -> None:
        """pg_ctl stop -m `mode`: fast (clean, clients cut) or immediate (a crash)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def promote(self) -> None:
        """Promote this standby; returns once it accepts writes."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "promote")


class ReplicatedPair:
    """A primary and its standby on loopback, each on its own port."""

    def __init__(self, folder: Path, *, synchronous: bool = True) -> None:
        primary_settings = dict(SERVER_SETTINGS)
        if synchronous:
            primary_settings["synchronous_standby_names"] = STANDBY_NAME
        self.primary = Server(folder / "primary", settings=primary_settings)
        self.standby = Server(folder / "standby", port=free_port(), settings=SERVER_SETTINGS)
        self.synchronous = synchronous

    def start(self) -> None:
        self.primary.start()
        self.standby.clone_from(self.primary)
        self.standby.start()
        self._wait_for_streaming()

    def _wait_for_streaming(self) -> None:
        wanted = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + REPLICATION_TIMEOUT_SECONDS
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,)
                ).fetchone()
                if row and row[0] == wanted:
                    return
                time.sleep(0.1)
        raise TimeoutError(f"the standby did not stream ({wanted}) within {REPLICATION_TIMEOUT_SECONDS} s")

    def url(self, dbname: str = "postgres") -> str:
        """The multi-host connection string a deployment gives its daemons: both hosts,
        and only the one that accepts writes will do."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://{SUPERUSER}@{hosts}/{dbname}?target_session_attrs=read-write&connect_timeout=2"

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            with contextlib.suppress(RuntimeError):
                server.stop()

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, *, synchronous: bool = True) -> Iterator[ReplicatedPair]:
        """A pair in a temporary folder, stopped and removed at the end of the block."""
        parent = Path(tempfile.mkdtemp(prefix="workflowd-pair-"))
        parent.chmod(0o755)  # the unprivileged server user must reach its data folders
        pair = cls(parent, synchronous=synchronous)
        try:
            pair.start()
            yield pair
        finally:
            try:
                pair.stop()
            finally:
                shutil.rmtree(parent, ignore_errors=True)
