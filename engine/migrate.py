"""The migrator: applies sql/migrations/NNNN_*.sql in order, each exactly once.

Many daemons may start at once; a session advisory lock serialises them, so the first
applies what is pending and the rest find nothing to do. Each file runs in its own
transaction together with its bookkeeping row, so a failed file leaves no trace. A
file that was applied and has since changed is refused: the schema it describes is no
longer the one in the database.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from engine.errors import MigrationError
from engine.sqlfiles import sql_dir

# An arbitrary constant: 'wfmigrat' read as a big-endian int64.
MIGRATION_LOCK_ID = int.from_bytes(b"wfmigrat", "big")
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS workflowd_migrations (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text: any edit after it was applied is detected."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def discover_migrations(folder: Path | None = None) -> list[Migration]:
    """The migration files of `folder` (default: the engine's), in the order to apply them."""
    folder = folder or sql_dir() / "migrations"
    migrations = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        if not _FILE_NAME.match(path.name):
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_snake_case.sql")
        migrations.append(Migration(path.name, path.read_text(encoding="utf-8")))
    numbers = [migration.name[:4] for migration in migrations]
    if len(set(numbers)) != len(numbers):
        raise MigrationError(f"two migration files share a number in {folder}")
    return migrations


async def applied_migrations(conn: AsyncConnection[Any]) -> dict[str, str]:
    """{file name: checksum} of the migrations the database has; empty before the first."""
    exists = await conn.execute("SELECT to_regclass('workflowd_migrations') IS NOT NULL")
    row = await exists.fetchone()
    if not row or not row[0]:
        return {}
    cursor = await conn.execute("SELECT name, checksum FROM workflowd_migrations")
    return dict(await cursor.fetchall())


async def pending_migrations(
    conn: AsyncConnection[Any], migrations: list[Migration] | None = None
) -> list[Migration]:
    """The migrations not yet applied; raises if an applied one has changed."""
    migrations = discover_migrations() if migrations is None else migrations
    applied = await applied_migrations(conn)
    for migration in migrations:
        recorded = applied.get(migration.name)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was changed after it was applied "
                f"(checksum {recorded[:12]} in the database, {migration.checksum[:12]} on "
                "disk); migrations are forward-only: restore the file and add a new one"
            )
    return [migration for migration in migrations if migration.name not in applied]


async def migrate(conn: AsyncConnection[Any], migrations: list[Migration] | None = None) -> list[str]:
    """Apply the pending migrations; returns the names applied (none when up to date).

    `conn` must not be inside a transaction: the lock is held by the session, and each
    file commits on its own.
    """
    if not conn.autocommit:
        await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
    try:
        await conn.execute(_CREATE_LEDGER)
        applied = []
        for migration in await pending_migrations(conn, migrations):
            async with conn.transaction():
                # A migration takes as long as it takes (the daemon's sessions bound each
                # statement); waiting for locks is still bounded by lock_timeout.
                await conn.execute("SET LOCAL statement_timeout = 0")
                # No parameters: psycopg sends the file as one simple query, so a file
                # may hold many statements.
                await conn.execute(migration.sql.encode("utf-8"))
                await conn.execute(
                    "INSERT INTO workflowd_migrations (name, checksum) VALUES (%s, %s)",
                    (migration.name, migration.checksum),
                )
            applied.append(migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))


async def schema_is_current(conn: AsyncConnection[Any]) -> bool:
    """Whether every migration this code knows has been applied (for readiness)."""
    applied = await applied_migrations(conn)
    return all(migration.name in applied for migration in discover_migrations())
