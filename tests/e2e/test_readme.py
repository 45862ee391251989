"""The README's code blocks run as a newcomer pastes them, so that the README cannot drift
from the code.

Every fenced block in README.md is preceded by `<!-- readme-test: MODE -->`, which says
how these tests run it (a block without one fails the first test):

- `dev`: its install line is checked (the extra exists), then its `workflowd dev` line
  runs in a fresh folder; `against dev` blocks then run in bash with the
  `export DATABASE_URL=...` line dev printed;
- `run`: its lines run in bash, `workflowd run` in the background, against a test
  database (the README's example URL is replaced by it, and the daemon's port by a free
  one); `against run` blocks then run in bash with the environment the `run` block set;
- `sql`: executed against the database of the `run` block's daemon; `python`: run as a
  script there; `module`: served by a daemon through `WORKFLOWD_MODULES=<its file>`;
  `archive`: executed, then retention prunes and the archive must hold what went;
- `make`: each line names a Makefile target; `usage`: each line names a subcommand and
  options the CLI has;
- `skip (why)`: not run, for the reason given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from daemon.cli import build_parser
from daemon.local_postgres import free_port
from engine.retention import RetentionPolicy, prune
from engine.store import Store
from tests.e2e.conftest import ROOT, Daemons, wait_until

README = ROOT / "README.md"
MODES = {"dev", "against dev", "run", "against run", "sql", "python", "module", "make", "usage", "archive"}
# What the README writes that a test machine must replace: its example database and port.
README_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
README_ADMIN_ADDRESS = "localhost:3000"
SERVER = re.compile(r"\bworkflowd (run|dev)\b")
INSTALL = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[([\w,]+)\]'$")
MAKE = re.compile(r"^make (\w+)\b")
SHELL_ENVIRONMENT = (
    "DATABASE_URL", "DB_HOST", "TEST_DATABASE_URL", "WORKFLOWD_ADMIN_TOKEN", "WORKFLOWD_ADMIN_TOKEN_FILE",
    "WORKFLOWD_MODULES", "NOTIFY_SOCKET", "INVOCATION_ID", "PYTHONPATH",
)  # fmt: skip


@dataclass(frozen=True)
class Block:
    mode: str | None
    language: str
    code: str
    line: int

    def lines(self) -> list[str]:
        """Its commands, a continued line (ending in a backslash) joined to the next."""
        return [line for line in self.code.replace("\\\n", " ").splitlines() if line.strip()]


def readme_blocks(mode: str | None = None) -> list[Block]:
    text = README.read_text()
    fence = re.compile(r"(?:^<!-- readme-test: (.+?) -->\n)?^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
    blocks = [
        Block(found[1], found[2], found[3], text.count("\n", 0, found.start(3)) + 1)
        for found in fence.finditer(text)
    ]
    return [block for block in blocks if mode is None or block.mode == mode]


def test_every_block_of_the_readme_says_how_the_tests_run_it() -> None:
    unsaid = [
        block.line
        for block in readme_blocks()
        if block.mode not in MODES and not (block.mode or "").startswith("skip (")
    ]
    assert not unsaid, f"README blocks without a known `<!-- readme-test: MODE -->` (lines {unsaid})"
    for mode in MODES:
        assert readme_blocks(mode), f"no README block of mode {mode!r}"


def test_install_and_make_lines_name_real_extras_and_targets() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    checked = 0
    for block in readme_blocks("dev") + readme_blocks("run") + readme_blocks("make"):
        for line in block.lines():
            if install := INSTALL.match(line):
                assert set(install[1].split(",")) <= set(extras), line
                checked += 1
            elif make := MAKE.match(line):
                assert make[1] in targets, line
                checked += 1
    assert checked >= 3


def test_the_cli_synopsis_names_real_subcommands_and_options() -> None:
    (synopsis,) = readme_blocks("usage")
    for line in synopsis.lines():
        for alternative in line.split("#")[0].split("|"):
            words = alternative.split()
            parser = command_parser(words[1:] if words[0] == "workflowd" else words)
            assert parser is not None, line
            known = {option for action in parser._actions for option in action.option_strings}
            for option in re.findall(r"--[\w-]+", alternative):
                assert option in known, f"{option} of {parser.prog}: {line}"


def command_parser(words: list[str]) -> argparse.ArgumentParser | None:
    """The parser of the (sub)command `words` begin with (`schedule add NAME ...`)."""
    parser, found = build_parser(), False
    for word in words:
        choices = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not choices or word not in choices[0].choices:
            break
        parser, found = choices[0].choices[word], True
    return parser if found else None


@pytest.fixture
def project() -> Iterator[Path]:
    """A folder as a fresh clone after its install: `.venv` (the tests' own) and `examples`.
    Not under pytest's tmp_path: as root dev's database runs as another user, who must be
    able to reach it."""
    folder = Path(tempfile.mkdtemp(prefix="workflowd-readme-"))
    folder.chmod(0o755)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    (folder / "examples").symlink_to(ROOT / "examples")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def clean_environment(**extra: str) -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in SHELL_ENVIRONMENT} | extra


def bash(code: str, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


class Server:
    """A block's server line running in the background, its output gathered line by line."""

    def __init__(self, line: str, folder: Path, env: dict[str, str]) -> None:
        self.output: list[str] = []
        self.process = subprocess.Popen(
            ["bash", "-c", line], cwd=folder, env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.gatherer = threading.Thread(target=self._gather, daemon=True)
        self.gatherer.start()

    def _gather(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def wait_ready(self, port: int) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, "".join(self.output)
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, "the README's server to answer /readyz", 0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # as Ctrl-C: bash and the server
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.gatherer.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()


def server_line(block: Block) -> str:
    (line,) = [line for line in block.lines() if SERVER.search(line)]
    return line


def dev_sessions() -> list[tuple[Block, list[Block]]]:
    """Each `dev` block with the `against dev` blocks that follow it, in README order."""
    sessions: list[tuple[Block, list[Block]]] = []
    for block in readme_blocks():
        if block.mode == "dev":
            sessions.append((block, []))
        elif block.mode == "against dev":
            sessions[-1][1].append(block)
    return sessions


def test_the_try_it_path_runs_against_dev_as_pasted(project: Path) -> None:
    sessions = dev_sessions()
    assert len(sessions) >= 2  # the built-in types, then the reader's own
    for dev_block, pasted_blocks in sessions:
        port = free_port()
        dev = Server(server_line(dev_block), project, clean_environment(PORT=str(port)))
        try:
            dev.wait_ready(port)
            printed = "".join(dev.output)
            export = re.search(r"^database   export (DATABASE_URL=\S+)$", printed, re.MULTILINE)
            assert export is not None, printed
            for block in pasted_blocks:
                pasted = bash(f"export {export[1]}\n{block.code}", project, clean_environment()).stdout
                for workflow_id in re.findall(r"started: workflow (\S+)", pasted):
                    wait_for_state(export[1].removeprefix("DATABASE_URL="), workflow_id, "completed")
                    if "workflowd list" in block.code:
                        assert pasted.count(workflow_id) == 2, pasted  # started, then shown
        finally:
            dev.stop()
        assert dev.process.returncode == 0, "".join(dev.output)


def wait_for_state(database_url: str, workflow_id: str, state: str) -> None:
    def reached() -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT state::text FROM workflows WHERE id = %s", (workflow_id,)).fetchone()
        return row == (state,)

    wait_until(reached, 60, f"workflow {workflow_id} to be {state}", 0.2)


def as_url(conninfo: str) -> str:
    """A postgresql:// URL for a key=value connection string: the README's spelling."""
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    password = f":{parts['password']}" if parts.get("password") else ""
    host = parts.get("host") or "127.0.0.1"
    return f"postgresql://{parts.get('user', 'postgres')}{password}@{host}:{parts.get('port', 5432)}/{parts['dbname']}"


def run_block_environment(block: Block, project: Path, db_url: str, port: int) -> dict[str, str]:
    """The environment the `run` block's lines before its server set (its exports)."""
    setup = [
        line for line in block.lines() if not SERVER.search(line) and not MAKE.match(line)
    ]  # make install: the tests run in what it installed
    script = "\n".join(setup).replace(README_DATABASE_URL, db_url) + "\nenv -0"
    shown = bash(script, project, clean_environment(PORT=str(port))).stdout
    return dict(entry.split("=", 1) for entry in shown.split("\0") if "=" in entry)


def test_the_production_path_runs_as_pasted(project: Path, db_url: str, db: psycopg.Connection[Any]) -> None:
    (run_block,) = readme_blocks("run")
    port = free_port()
    env = run_block_environment(run_block, project, as_url(db_url), port)
    assert env["DATABASE_URL"] == as_url(db_url)
    assert len(env["WORKFLOWD_ADMIN_TOKEN"]) >= 32
    daemon = Server(server_line(run_block), project, env)
    try:
        daemon.wait_ready(port)
        for block in readme_blocks("against run"):
            code = block.code.replace(README_ADMIN_ADDRESS, f"localhost:{port}")
            shell = {name: value for name, value in env.items() if name != "WORKFLOWD_MODULES"}
            bash(code, project, shell)
        greetings = db.execute("SELECT id::text FROM workflows WHERE type = 'greeting'").fetchall()
        assert len(greetings) == 2  # one started by the CLI, one over HTTP
        for (workflow_id,) in greetings:
            wait_for_state(db_url, workflow_id, "completed")
        cancelled = db.execute(
            "SELECT w.state::text, e.actor FROM workflows w JOIN workflow_events e ON e.workflow_id = w.id "
            "WHERE w.type = 'invoice' AND e.to_state = 'cancelled'"
        ).fetchall()
        assert cancelled == [("cancelled", "alice via admin-api:127.0.0.1")]
        run_the_starting_snippets(project, db_url, db)
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0, "".join(daemon.output)


def run_the_starting_snippets(project: Path, db_url: str, db: psycopg.Connection[Any]) -> None:
    """The SQL insert and the Python script of "Starting workflows", against the daemon."""
    (insert,) = readme_blocks("sql")
    db.execute(insert.code)
    (by_sql,) = db.execute("SELECT id::text FROM workflows WHERE type = 'trade_execution'").fetchone()  # type: ignore[misc]
    wait_for_state(db_url, by_sql, "completed")
    (script,) = readme_blocks("python")
    (project / "trade.py").write_text(script.code)
    ran = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "trade.py"], cwd=project,
        env=clean_environment(DATABASE_URL=db_url), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (trade_hash,) = db.execute(
        "SELECT output->>'tradeHash' FROM workflows WHERE type = 'trade_execution' AND user_id = 'u2'"
    ).fetchone()  # type: ignore[misc]
    assert ran.stdout.splitlines()[-1] == trade_hash


def test_the_definition_module_is_served_as_written(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    (module,) = readme_blocks("module")
    path = daemons.log_dir / "my_flows.py"
    path.write_text(module.code)
    daemons.start(modules=str(path))
    payout = json.dumps({"account": "ES91", "amount": 2.5})
    db.execute("INSERT INTO workflows (type, input, user_id) VALUES ('payout', %s, 'u1')", (payout,))
    wait_until(
        lambda: db.execute("SELECT state::text FROM workflows").fetchone() == ("completed",), 30, "the payout"
    )
    (output,) = db.execute("SELECT output FROM workflows").fetchone()  # type: ignore[misc]
    assert output == {"paid": 2.5, "to": "ES91"}
    wait_until(
        lambda: db.execute("SELECT name, cron, timezone, declared FROM workflow_schedules").fetchall()
        == [("nightly-payout", "0 3 * * *", "Europe/Paris", True)], 10, "the module's schedule to be declared",
    )  # fmt: skip


async def test_the_archive_sql_keeps_what_retention_deletes(db_url: str, db: psycopg.Connection[Any]) -> None:
    (archive,) = readme_blocks("archive")
    db.execute(archive.code)
    db.execute(
        "INSERT INTO workflows (type, input, state, completed_at) "
        "SELECT 't', jsonb_build_object('n', n), 'completed', now() - interval '40 days' FROM generate_series(1, 7) n"
    )
    kept = db.execute("SELECT id, input FROM workflows ORDER BY id").fetchall()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        pruned = await prune(Store(conn), RetentionPolicy.from_days(30, 90))
    assert pruned.removed["completed"] == 7
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)
    assert db.execute("SELECT id, input FROM workflows_archive ORDER BY id").fetchall() == kept
