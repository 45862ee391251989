"""Readiness: does the database answer, and does it hold the schema this code expects?
And, when a read replica is configured, how far behind it is.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from engine.migrate import schema_is_current
from engine.primary import connect_to_primary

READINESS_TIMEOUT_SECONDS = 2.0
READINESS_CACHE_SECONDS = 1.0
# Shows the probe's backend for what it is in pg_stat_activity.
HEALTH_APPLICATION_NAME = "workflowd-health"
REPLICA_APPLICATION_NAME = "workflowd-replica-health"
T = TypeVar("T")


@dataclass(frozen=True)
class DatabaseHealth:
    database: bool
    schema_current: bool


@dataclass(frozen=True)
class ReplicaHealth:
    reachable: bool
    # Seconds the replica's data is behind the primary's (0 when it has replayed all it
    # received); None when it could not be asked.
    lag_seconds: float | None


# On a replica: how far behind its data is. An idle primary sends nothing to replay, so
# the age of the last replayed commit is a lag only while WAL waits to be replayed.
REPLICA_LAG = """
SELECT CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END
"""

Connect = Callable[..., Awaitable[AsyncConnection[Any]]]


class Probe(Generic[T]):
    """A question for a database, asked at most once a second on one connection of its
    own; probes that arrive while it is being asked wait for that one answer."""

    def __init__(
        self, conninfo: str, application_name: str, *, connect: Connect = connect_to_primary
    ) -> None:
        self.conninfo = conninfo
        self.application_name = application_name
        self._connect = connect
        self._conn: AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._answer = self.unanswered()
        self._answered_at = -math.inf

    def unanswered(self) -> T:
        """The answer when the database could not be asked."""
        raise NotImplementedError

    async def question(self, conn: AsyncConnection[Any]) -> T:
        raise NotImplementedError

    async def check(self) -> T:
        """The last answer if it is under a second old, else a new one."""
        async with self._lock:
            if time.monotonic() - self._answered_at >= READINESS_CACHE_SECONDS:
                self._answer = await self._ask()
                self._answered_at = time.monotonic()
            return self._answer

    async def _ask(self) -> T:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
                return await self.question(await self._connection())
        except asyncio.CancelledError:
            await self.close()  # cancelled mid-query: the connection's state is unknown
            raise
        except Exception:
            # Whatever went wrong (an outage, a timeout mid-query) may have left the
            # connection unusable: the next question starts on a new one.
            await self.close()
            return self.unanswered()

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect(
                self.conninfo, autocommit=True, application_name=self.application_name
            )
        return self._conn

    async def close(self) -> None:
        """Close the probe's connection (a new one is made when asked again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


class Readiness(Probe[DatabaseHealth]):
    """Does the primary answer, and does it hold the schema this code expects?"""

    def __init__(self, conninfo: str) -> None:
        # Once current, the schema stays current: only a migration changes it.
        self._schema_current = False
        super().__init__(conninfo, HEALTH_APPLICATION_NAME)

    def unanswered(self) -> DatabaseHealth:
        return DatabaseHealth(database=False, schema_current=self._schema_current)

    async def question(self, conn: AsyncConnection[Any]) -> DatabaseHealth:
        await conn.execute("SELECT 1")
        self._schema_current = self._schema_current or await schema_is_current(conn)
        return DatabaseHealth(database=True, schema_current=self._schema_current)


class ReplicaLag(Probe[ReplicaHealth]):
    """How far behind the read replica (WORKFLOWD_READ_DATABASE_URL) is."""

    def __init__(self, conninfo: str) -> None:
        # A replica refuses writes by design: any server will do here.
        super().__init__(conninfo, REPLICA_APPLICATION_NAME, connect=AsyncConnection.connect)

    def unanswered(self) -> ReplicaHealth:
        return ReplicaHealth(reachable=False, lag_seconds=None)

    async def question(self, conn: AsyncConnection[Any]) -> ReplicaHealth:
        row = await (await conn.execute(REPLICA_LAG)).fetchone()
        return ReplicaHealth(reachable=True, lag_seconds=round(float(row[0]), 3) if row else None)
