"""`workflowd run` as a child process: launched the same way by the e2e fixture and by the
fault suite (python -m tests.chaos), and read back through its JSON log lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.local_postgres import free_port

ROOT = Path(__file__).resolve().parents[1]

# Log events that mean the daemon hit a bug it survived only by its safety nets.
CRASH_SUFFIX = "_crashed"


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

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_events(self) -> list[dict[str, Any]]:
        return read_log_events(self.log_path)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def launch(
    db_url: str,
    log_path: Path,
    modules: str,
    settings: Mapping[str, Any] | None = None,
    env_extra: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    root: Path = ROOT,
) -> Daemon:
    """Start `workflowd run` on a free port, its stdout and stderr in `log_path`.

    `settings` are WORKFLOWD_* names without the prefix (lease_seconds=2); `env_extra`
    is applied last, so a caller may point DATABASE_URL elsewhere (a proxy). `root`: the
    source tree to run (another release's, unpacked elsewhere).
    """
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "PYTHONPATH": str(root),
        "WORKFLOWD_MODULES": modules,
        "WORKFLOWD_LOG_FORMAT": "json",
        "PORT": str(port),
    }
    env.update({f"WORKFLOWD_{name.upper()}": str(value) for name, value in (settings or {}).items()})
    env.update(env_extra or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    return Daemon(process, log_path, port)


def read_log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a daemon's log; a line a kill -9 cut in half is skipped."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def crash_lines(events: Iterable[dict[str, Any]], expected: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The `*_crashed` and `critical` lines among `events` whose event is not in `expected`.

    A daemon's safety nets (a crashed claim is retried, a crashed workflow task is
    dropped) keep it alive through a bug; these lines are how a test still sees the bug.
    """
    allowed = set(expected)
    return [
        event
        for event in events
        if (str(event.get("event", "")).endswith(CRASH_SUFFIX) or event.get("level") == "critical")
        and event.get("event") not in allowed
    ]


def crash_events(daemons: Iterable[Daemon], expected: Iterable[str] = ()) -> list[dict[str, Any]]:
    """crash_lines of the logs of all `daemons`."""
    return crash_lines((event for daemon in daemons for event in daemon.log_events()), expected)
