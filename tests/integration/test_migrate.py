"""The migrator: in order, once, under a lock; changed files refused; failures leave no trace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.errors import MigrationError
from engine.migrate import discover_migrations, migrate, schema_is_current
from engine.sqlfiles import sql_dir


async def _migrate(url: str, folder: Path | None = None) -> list[str]:
    migrations = discover_migrations(folder) if folder else None
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await migrate(conn, migrations)


def _ledger(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT name, count(*) FROM workflowd_migrations GROUP BY name ORDER BY name"
        ).fetchall()


def test_four_concurrent_migrators_apply_each_file_once(empty_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "daemon", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], outputs
    names = [migration.name for migration in discover_migrations()]
    assert _ledger(empty_db_url) == [(name, 1) for name in names]
    appliers = [out for out, _ in outputs if "applied" in out]
    assert len(appliers) == 1, outputs
    assert sum("up to date" in out for out, _ in outputs) == 3


async def test_rerunning_is_a_no_op(empty_db_url: str) -> None:
    first = await _migrate(empty_db_url)
    assert first == [migration.name for migration in discover_migrations()]
    assert await _migrate(empty_db_url) == []
    async with await psycopg.AsyncConnection.connect(empty_db_url) as conn:
        assert await schema_is_current(conn)


async def test_a_changed_migration_is_refused_naming_the_file(empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(sql_dir() / "migrations", folder)
    await _migrate(empty_db_url, folder)
    edited = folder / "0001_init.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"migration 0001_init\.sql was changed after it was applied"):
        await _migrate(empty_db_url, folder)


async def test_a_failing_migration_leaves_no_trace_and_later_files_wait(
    empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_first.sql").write_text("CREATE TABLE first_table (id int);")
    (folder / "0002_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT no_such_function();")
    (folder / "0003_third.sql").write_text("CREATE TABLE third_table (id int);")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        await _migrate(empty_db_url, folder)
    assert _ledger(empty_db_url) == [("0001_first.sql", 1)]
    with psycopg.connect(empty_db_url) as conn:
        tables = conn.execute("SELECT to_regclass('half_done'), to_regclass('third_table')").fetchone()
    assert tables == (None, None)


def test_badly_named_migration_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"1_init\.sql"):
        discover_migrations(tmp_path)


def test_the_cli_reports_a_changed_migration_in_one_line(empty_db_url: str, tmp_path: Path) -> None:
    # The CLI migrates the engine's own files; stage a mismatch by rewriting the ledger.
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    subprocess.run([sys.executable, "-m", "daemon", "migrate"], env=env, check=True, capture_output=True)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("UPDATE workflowd_migrations SET checksum = 'deadbeef' WHERE name = '0001_init.sql'")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "0001_init.sql was changed after it was applied" in result.stderr
    assert "Traceback" not in result.stderr


async def test_migration_0005_fails_the_runnable_rows_that_break_its_rules_and_keeps_what_they_held(
    empty_db_url: str, tmp_path: Path
) -> None:
    for name in ("0001_init.sql", "0002_compensation.sql", "0003_ledgers.sql", "0004_hot_updates.sql"):
        shutil.copy(sql_dir() / "migrations" / name, tmp_path / name)
    await _migrate(empty_db_url, tmp_path)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input, context, state) VALUES "
            "('a', '[1]', '{}', 'pending'), ('b', '{}', '[2]', 'running'), ('c', '[3]', '{}', 'completed')"
        )
    assert "0005_row_checks.sql" in await _migrate(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute(
            "SELECT type, state::text, input, context, error->>'type', error->'input', error->'context' "
            "FROM workflows ORDER BY type"
        ).fetchall()
        events = conn.execute("SELECT from_state, to_state FROM workflow_events ORDER BY id").fetchall()
    assert rows == [
        ("a", "failed", {}, {}, "InvalidRow", [1], {}),
        ("b", "failed", {}, {}, "InvalidRow", {}, [2]),
        # A finished row stays as it was: the new rules check new rows and updates only.
        ("c", "completed", [3], {}, None, None, None),
    ]
    assert sorted(events) == [("pending", "failed"), ("running", "failed")]
