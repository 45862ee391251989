"""Only the primary will do: a session on a server that refuses writes is recognised from
what the server reports, closed and refused, before anyone borrows it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from engine.primary import ReadOnlyServerError, connect_to_primary, refuses_writes


@pytest.fixture
def read_only_db_url(db_url: str, db: psycopg.Connection[Any]) -> str:
    """The test's database, its new sessions read-only (as on a standby)."""
    name = conninfo_to_dict(db_url)["dbname"]
    db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    return db_url


async def test_a_writable_server_is_taken(db_url: str) -> None:
    async with await connect_to_primary(db_url, autocommit=True) as conn:
        assert not refuses_writes(conn)
        await conn.execute("CREATE TEMP TABLE written (n int)")


async def test_a_read_only_server_is_refused_and_the_connection_closed(read_only_db_url: str) -> None:
    conn = await AsyncConnection.connect(read_only_db_url, autocommit=True)
    assert refuses_writes(conn)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await conn.execute("CREATE TABLE refused (n int)")
    with pytest.raises(ReadOnlyServerError, match="refuses writes"):
        await connect_to_primary(read_only_db_url, autocommit=True)
    await conn.close()


async def test_a_session_that_turns_read_only_says_so_without_a_query(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """The server reports the change to the client, so the pools' reset check is free."""
    async with await AsyncConnection.connect(db_url, autocommit=True) as conn:
        assert not refuses_writes(conn)
        await conn.execute("SET default_transaction_read_only = on")
        assert refuses_writes(conn)
