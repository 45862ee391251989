"""`workflowd dev` as a new user runs it: no database configured, one command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import structlog

from daemon import local_postgres
from daemon.cli import main
from daemon.local_postgres import free_port
from daemon.settings import ADMIN_TOKEN_MIN_LENGTH
from tests.e2e.conftest import ROOT

SAMPLE_SIZE = 20
UNSET = (
    "DATABASE_URL",
    "DB_HOST",
    "TEST_DATABASE_URL",
    "WORKFLOWD_ADMIN_TOKEN",
    "WORKFLOWD_ADMIN_TOKEN_FILE",
    "WORKFLOWD_MODULES",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
)


@pytest.fixture
def project() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root the database runs as another user, who must
    # be able to reach the data folder.
    folder = Path(tempfile.mkdtemp(prefix="workflowd-dev-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def running_dev(folder: Path, port: int, *args: str, **settings: str) -> Iterator[subprocess.Popen[str]]:
    """`workflowd dev` in `folder`, killed at the end if the test did not stop it."""
    env = {name: value for name, value in os.environ.items() if name not in UNSET}
    env |= {"PORT": str(port), "PYTHONPATH": str(ROOT), **settings}
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "dev", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def stop_dev(process: subprocess.Popen[str]) -> str:
    """Ctrl-C; what it printed until it exited, which it must do cleanly."""
    process.send_signal(signal.SIGINT)
    assert process.stdout is not None
    rest = process.stdout.read()  # what readline() buffered, then the rest until exit
    assert process.wait(timeout=30) == 0, rest
    return rest


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    pytest.fail(f"no {marker!r} within {timeout} s:\n{''.join(seen)}")


def run_once(folder: Path, expected_total: int) -> str:
    port = free_port()
    with running_dev(folder, port) as process:
        shown = read_until(process, "summary", 120)
        token = re.search(r"token: ([\w-]+)\)", shown)
        assert token is not None, shown
        assert len(token[1]) >= ADMIN_TOKEN_MIN_LENGTH  # the daemon would refuse a shorter one
        assert "serving    ai_job_chain, contract_deployment, indexing_verification, reward_grant, " in shown
        assert "15% of their calls fail on purpose" in shown
        database = re.search(r"^database   export DATABASE_URL=(\S+)$", shown, re.MULTILINE)
        assert database is not None, shown
        start_with_the_printed_url(database[1])
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz").json()["status"] == "ready"
        stats = httpx.get(
            f"{url}/admin/workflows/stats/overview", headers={"Authorization": f"Bearer {token[1]}"}
        ).json()
        assert sum(stats["by_state"].values()) == expected_total
        return shown + stop_dev(process)


def workflowd(database_url: str, *args: str) -> str:
    env = {name: value for name, value in os.environ.items() if name not in UNSET}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", *args], env=env | {"DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def start_with_the_printed_url(database_url: str) -> None:
    """The README's first commands, against dev, with the DATABASE_URL it printed."""
    started = workflowd(database_url, "start", "reward_grant", "--user", "u1",
                        "--input", '{"amount": 10, "reason": "welcome"}', "--json")  # fmt: skip
    workflow_id = json.loads(started)["id"]
    deadline = time.monotonic() + 60
    while "completed" not in workflowd(database_url, "status", workflow_id).splitlines()[2]:
        assert time.monotonic() < deadline, "dev did not run the workflow started with its DATABASE_URL"
        time.sleep(0.3)
    assert workflow_id in workflowd(database_url, "list", "--state", "completed")


def test_dev_runs_the_whole_system_and_keeps_its_data_for_the_next_run(project: Path) -> None:
    first = run_once(project, SAMPLE_SIZE + 1)
    assert "new data in .workflowd/pgdata" in first
    summary = first.split("summary", 1)[1]
    for workflow_type in (
        "contract_deployment",
        "trade_execution",
        "ai_job_chain",
        "indexing_verification",
        "reward_grant",
    ):
        assert re.search(rf"{workflow_type}\s+3\s+", summary), summary
    assert (project / ".workflowd" / "pgdata" / "PG_VERSION").exists()
    # The README's start, made again, finds the first run's workflow (same idempotency key).
    second = run_once(project, 2 * SAMPLE_SIZE + 1)
    assert "existing data in .workflowd/pgdata" in second


def test_dev_never_starts_an_embedded_database_under_systemd(project: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name not in UNSET}
    env |= {"INVOCATION_ID": "0123456789abcdef", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "dev"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "does not start an embedded database under systemd" in result.stderr
    assert not (project / ".workflowd" / "pgdata").exists()


def test_without_postgresql_binaries_dev_says_how_to_get_them(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(project)
    monkeypatch.setattr(local_postgres, "embedded_bindirs", list)
    monkeypatch.setattr(local_postgres, "DEBIAN_POSTGRESQL", project / "no-debian")
    monkeypatch.setenv("PATH", str(project / "no-bin"))
    monkeypatch.delenv("WORKFLOWD_PG_BINDIR", raising=False)
    try:
        assert main(["dev"]) == 2
    finally:
        structlog.reset_defaults()  # dev pointed the logs at a file it has closed
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "no PostgreSQL server binaries found" in message
    assert "pip install 'stellara-workflows[embedded]'" in message


@pytest.mark.parametrize("token_source", ["environment", "file"])
def test_dev_refuses_a_database_it_did_not_make_unless_forced(
    project: Path, db_url: str, token_source: str
) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "daemon", "dev"], cwd=project, capture_output=True, text=True, timeout=60,
        env={name: value for name, value in os.environ.items() if name not in UNSET} | {"DATABASE_URL": db_url},
        check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "is not a database dev made (it has no dev marker)" in refused.stderr
    assert "or pass --force" in refused.stderr
    # Forced, it serves that database, and never echoes the token it was given.
    secret = "a-token-the-user-set-0123456789-abcdef"
    token_file = project / "admin-token"
    token_file.write_text(secret + "\n")
    given, pointer = {
        "environment": ({"WORKFLOWD_ADMIN_TOKEN": secret}, "$WORKFLOWD_ADMIN_TOKEN"),
        "file": ({"WORKFLOWD_ADMIN_TOKEN_FILE": str(token_file)}, f"$(cat {token_file})"),
    }[token_source]
    port = free_port()
    with running_dev(project, port, "--force", DATABASE_URL=db_url, **given) as process:
        shown = read_until(process, "summary", 120)
        assert "database   the DATABASE_URL you set" in shown
        assert f"(token: {pointer})" in shown
        stats = httpx.get(
            f"http://127.0.0.1:{port}/admin/workflows/stats/overview",
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert sum(stats.json()["by_state"].values()) == SAMPLE_SIZE
        assert secret not in shown + stop_dev(process)
