"""Only the primary will do.

After a failover a connection can land on a server that refuses writes: a standby
(a URL without target_session_attrs=read-write, a DNS name or virtual IP that still
points at the old primary, restarted as a replica), or a primary set read-only. Such a
connection is never lent out: the pools drop it when they make it and when it comes
back, and the statement that met one is retried like one that met an outage, never
counted against a step.

The check costs nothing: PostgreSQL 14 and later report `in_hot_standby` and
`default_transaction_read_only` to the client when a session starts and whenever they
change, so the answer is already on the client's side. Older servers report neither;
there the statement's own error (SQLSTATE 25006) is the signal.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection

# A statement refused by a server in read-only mode (SQLSTATE 25006).
READ_ONLY_ERRORS = (psycopg.errors.ReadOnlySqlTransaction,)


class ReadOnlyServerError(psycopg.OperationalError):
    """The connection's server refuses writes: a standby, or a primary set read-only."""


def refuses_writes(conn: AsyncConnection[Any]) -> bool:
    """Whether the server said it is a standby or read-only (from the session's reports)."""
    info = conn.info
    return "on" in (
        info.parameter_status("in_hot_standby"),
        info.parameter_status("default_transaction_read_only"),
    )


async def require_primary(conn: AsyncConnection[Any]) -> None:
    """A pool's configure and reset hook: a connection to a server that refuses writes is
    closed and refused, so the pool makes another, to whichever host is the primary now."""
    if refuses_writes(conn):
        host = f"{conn.info.host}:{conn.info.port}"
        await conn.close()
        raise ReadOnlyServerError(f"the server at {host} refuses writes (a standby, or read-only)")


async def connect_to_primary(conninfo: str, **kwargs: Any) -> AsyncConnection[Any]:
    """AsyncConnection.connect, refusing a server that refuses writes."""
    conn = await AsyncConnection.connect(conninfo, **kwargs)
    await require_primary(conn)
    return conn
