"""Readiness: does the database answer, and does it hold the schema this code expects?

Probes come from load balancers, orchestrators and, in a flood, from anyone who can
reach the port; none of them may cost the daemon more than one query a second, nor
wait behind the admin API. So the question is asked on a connection of its own (not
the admin API's pool, which slow requests may hold), the answer is kept for a second,
and probes that arrive while it is being found wait for that one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from engine.migrate import schema_is_current
from engine.primary import connect_to_primary

READINESS_TIMEOUT_SECONDS = 2.0
READINESS_CACHE_SECONDS = 1.0
# Shows the probe's backend for what it is in pg_stat_activity.
HEALTH_APPLICATION_NAME = "workflowd-health"


@dataclass(frozen=True)
class DatabaseHealth:
    database: bool
    schema_current: bool


class Readiness:
    """The database's health, asked at most once a second on one connection of its own."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._answer = DatabaseHealth(database=False, schema_current=False)
        self._answered_at = -math.inf
        # Once current, the schema stays current: only a migration changes it.
        self._schema_current = False

    async def check(self) -> DatabaseHealth:
        """The last answer if it is under a second old, else a new one."""
        async with self._lock:
            if time.monotonic() - self._answered_at >= READINESS_CACHE_SECONDS:
                self._answer = await self._ask()
                self._answered_at = time.monotonic()
            return self._answer

    async def _ask(self) -> DatabaseHealth:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
                conn = await self._connection()
                await conn.execute("SELECT 1")
                self._schema_current = self._schema_current or await schema_is_current(conn)
        except asyncio.CancelledError:
            await self.close()  # cancelled mid-query: the connection's state is unknown
            raise
        except Exception:
            # Whatever went wrong (an outage, a timeout mid-query) may have left the
            # connection unusable: the next question starts on a new one.
            await self.close()
            return DatabaseHealth(database=False, schema_current=self._schema_current)
        return DatabaseHealth(database=True, schema_current=self._schema_current)

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect_to_primary(
                self.conninfo, autocommit=True, application_name=HEALTH_APPLICATION_NAME
            )
        return self._conn

    async def close(self) -> None:
        """Close the probe's connection (a new one is made when asked again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
