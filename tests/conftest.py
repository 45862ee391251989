"""Throwaway PostgreSQL databases for the tests.

The server, in order of preference: TEST_DATABASE_URL (any database of a server where
we may create databases); a testcontainers PostgreSQL when a Docker engine answers; a
temporary cluster from the machine's PostgreSQL binaries. The schema is migrated once
into a template database, and every test gets its own clone, dropped after it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from daemon.local_postgres import LocalPostgres
from engine import WorkflowService
from engine.migrate import migrate

# Throwaway clusters need no durability: a crash loses a test run, nothing else.
FAST_UNSAFE_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker  # type: ignore[import-untyped]  # noqa: PLC0415 (only when Docker may exist)

        client = docker.from_env(timeout=2)
    except Exception:
        return False
    try:
        client.ping()
    except Exception:
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Connection string of a server database from which test databases are created."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        with LocalPostgres.temporary(FAST_UNSAFE_SETTINGS) as cluster:
            yield cluster.url()


def database_url(server_url: str, name: str) -> str:
    """The connection string of database `name` on the server of `server_url`."""
    return make_conninfo(server_url, dbname=name)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(statement)
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def migrate_url(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await migrate(conn)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """Name of a database holding the migrated schema, cloned by `db_url`."""
    name = f"wfd_template_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name)
    try:
        asyncio.run(migrate_url(url))
        yield name
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def db_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    name = f"wfd_test_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_db)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def empty_db_url(pg_server: str) -> Iterator[str]:
    """A database with no schema at all, for the migrator's tests."""
    name = f"wfd_empty_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to the test's database, for staging and checking rows."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def service(db_url: str) -> AsyncIterator[WorkflowService]:
    """A WorkflowService on the test's database, with no definitions registered."""
    async with WorkflowService.connect(db_url) as svc:
        yield svc
