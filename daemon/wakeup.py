"""LISTEN/NOTIFY wake-up: a dedicated connection that wakes the claim loop on inserts.

A notification only says "look now"; the poll interval is the safety net, so a lost
notification (or a dropped listening connection) costs at most one poll interval.
"""

from __future__ import annotations

import asyncio

import psycopg
import structlog

from engine.primary import connect_to_primary

CHANNEL = "workflowd"
RECONNECT_DELAY_MAX_SECONDS = 5.0

LOG = structlog.get_logger("workflowd.wakeup")


class Listener:
    """Sets `wake` on every notification; reconnects with backoff after a drop."""

    def __init__(self, conninfo: str, wake: asyncio.Event) -> None:
        self.conninfo = conninfo
        self.wake = wake
        # Set each time the listener gets in: the database answers again.
        self.connected = asyncio.Event()

    async def run_once(self) -> None:
        """Connect, LISTEN, and relay notifications until the connection drops."""
        # On the primary: a standby would accept the LISTEN, and never hear a NOTIFY.
        connect = connect_to_primary(self.conninfo, autocommit=True, application_name="workflowd-listener")
        async with await connect as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self.connected.set()
            # Inserts made while we were not listening sent notifications we never saw.
            self.wake.set()
            async for _ in conn.notifies():
                self.wake.set()

    async def run(self) -> None:
        """run_once forever, riding out database outages."""
        delay = 0.1
        while True:
            try:
                await self.run_once()
                delay = 0.1
            except psycopg.OperationalError as error:
                LOG.warning("listener_disconnected", error=str(error).strip(), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)
