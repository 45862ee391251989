"""What a run costs the primary: the server's CPU time, its WAL, its connections and what
its backends waited on; and the daemons' own CPU time beside it. These are the figures
docs/scaling.md reads to say how far one primary carries the engine.

CPU time comes from /proc (Linux): the postmaster's own and its reaped children's
(utime, stime, cutime, cstime), plus the live children's, so that backends that ended
during the run are counted too.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from daemon.local_postgres import LocalPostgres

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; everything after its ")" splits cleanly.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """utime + stime of `pid` (and cutime + cstime: its children that ended)."""
    fields = _stat_fields(pid)
    # After the name: state is fields[0], so utime, stime, cutime, cstime are 11 to 14.
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS_PER_SECOND


def server_cpu_seconds(cluster: LocalPostgres) -> float:
    """CPU time the whole server has used so far: the postmaster, the backends and
    workers that ended, and those alive now."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    total = process_cpu_seconds(postmaster, with_reaped_children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            if int(fields[1]) == postmaster:  # field 4, the parent
                total += process_cpu_seconds(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended while we looked: counted with the postmaster's children
    return total


@dataclass
class PrimaryCost:
    """Measured over one drain: start() before, sample() while, finish() after."""

    cluster: LocalPostgres
    dbname: str
    cpu_at_start: float = 0.0
    wal_at_start: str = "0/0"
    connections: int = 0
    waits: Counter[str] = field(default_factory=Counter)

    def start(self, conn: psycopg.Connection[Any]) -> None:
        self.wal_at_start = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
        self.cpu_at_start = server_cpu_seconds(self.cluster)

    def sample(self, conn: psycopg.Connection[Any]) -> None:
        """The daemons' connections now, and what their busy backends wait on."""
        rows = conn.execute(
            "SELECT state, coalesce(wait_event_type, 'CPU') FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE 'workflowd%%'",
            (self.dbname,),
        ).fetchall()
        self.connections = max(self.connections, len(rows))
        self.waits.update(str(wait) for state, wait in rows if state == "active")

    def finish(self, conn: psycopg.Connection[Any], workflows: int, steps: int) -> dict[str, Any]:
        cpu = server_cpu_seconds(self.cluster) - self.cpu_at_start
        wal = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (self.wal_at_start,)
        ).fetchone()
        wal_bytes = float(wal[0])  # type: ignore[index]
        busy = sum(self.waits.values()) or 1
        return {
            "server_cpu_seconds": round(cpu, 2),
            "server_cpu_ms_per_workflow": round(1000 * cpu / workflows, 3),
            "server_cpu_ms_per_step": round(1000 * cpu / (workflows * steps), 3),
            "workflows_per_server_core_second": round(workflows / cpu) if cpu else None,
            "wal_bytes_per_workflow": round(wal_bytes / workflows),
            "daemon_connections_max": self.connections,
            "active_backends_waiting_on": {
                wait: round(100 * count / busy, 1) for wait, count in self.waits.most_common()
            },
        }
