"""Peer benchmarks: the throughput of other PostgreSQL-backed job and workflow systems
(PgQueuer, Procrastinate, DBOS Transact) on the same cluster as workflowd's own figures.

The peers are never dependencies of the project: they live in a virtualenv of their own
(bench/.venv-peers, from bench/peers/requirements.txt), and bench/peers/run.py runs there
as a subprocess, one system at a time, and prints its result as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

from bench.daemon import drop_database, empty_database
from daemon.local_postgres import LocalPostgres

PEERS = Path(__file__).parent / "peers"
PEERS_VENV = Path(__file__).parent / ".venv-peers"
REQUIREMENTS = PEERS / "requirements.txt"
RUNNER = PEERS / "run.py"
# Written after a successful install: a changed requirements file means installing again.
STAMP = PEERS_VENV / "requirements.sha256"
# Beyond run.py's own --timeout: its set-up and the stopping of its workers.
TIMEOUT_MARGIN_SECONDS = 180


def ensure_peers_venv() -> Path:
    """The peers' python, after creating their virtualenv and installing the pinned
    requirements if that has not been done for this requirements file."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text().strip() != wanted:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "-r", str(REQUIREMENTS)],
            check=True,
        )  # fmt: skip
        STAMP.write_text(wanted + "\n")
    return python


def as_url(conninfo: str) -> str:
    """A postgresql:// URL for a key=value connection string: asyncpg and DBOS take URLs only."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.get("user", "postgres")), safe="")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", 5432)
    dbname = quote(str(params.get("dbname", "postgres")), safe="")
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def peer_throughput(
    cluster: LocalPostgres, system: str, processes: int, jobs: int, steps: int = 1, timeout: float = 300
) -> dict[str, Any]:
    """Throughput of `system` draining `jobs` no-op jobs (DBOS: workflows of `steps` no-op
    steps) with `processes` worker processes, in a fresh database on `cluster` that is
    dropped afterwards. The result is run.py's JSON: seconds, jobs_per_s, steps_per_s,
    version and config, and timed_out with jobs_done (fewer than `jobs` if it timed out)."""
    options = ["--jobs", str(jobs), "--processes", str(processes), "--steps", str(steps)]
    return run_peer(cluster, system, f"bench_peer_{system}_{processes}", options, timeout)


def pgqueuer_pickup(cluster: LocalPostgres, inserts: int, timeout: float = 300) -> dict[str, Any]:
    """PgQueuer's pickup latency measured as the bench measures workflowd's (two idle
    worker processes, `inserts` single enqueues 10 ms apart): run.py's JSON with p50_ms,
    p95_ms and p99_ms."""
    options = ["--pickup", str(inserts), "--processes", "2"]
    return run_peer(cluster, "pgqueuer", "bench_peer_pgqueuer_pickup", options, timeout)


def run_peer(
    cluster: LocalPostgres, system: str, database: str, options: list[str], timeout: float
) -> dict[str, Any]:
    """run.py for `system` with `options` in a fresh database on `cluster`, dropped
    afterwards: the JSON line it prints."""
    python = ensure_peers_venv()
    url = as_url(empty_database(cluster, database))
    try:
        command = [
            str(python), str(RUNNER), "--dsn", url, "--system", system, *options, "--timeout", str(timeout),
        ]  # fmt: skip
        result = subprocess.run(
            command, stdout=subprocess.PIPE, check=True, text=True, timeout=timeout + TIMEOUT_MARGIN_SECONDS
        )
    finally:
        drop_database(cluster, database)
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed
