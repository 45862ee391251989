"""The event relay's cursor over the timeline: which committed events to publish next,
and the record of what the broker has confirmed (sql/queries/relay.sql, migration 0020).

A batch is the events whose transaction finished between two snapshots, `published`
and `batch`, read in pages in id order. Batches follow commit order, so a workflow's
transitions come out in the timeline's order, and none is skipped however late its
transaction commits. Progress is written only after the broker has confirmed a page: a
relay killed in between publishes that page again (at least once, never lost). A batch
that turns out empty moves the cursor in memory only, so an idle relay writes nothing.

The daemon (daemon/relay.py) decides who runs it (one leader at a time) and publishes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from engine.store import Row, Store, snapshot_xmax

# The cursor's name in workflow_event_relays: one per broker the events go to.
RELAY_NAME = "events"
# An arbitrary constant: 'wfrelay!' read as a big-endian int64.
RELAY_LOCK_ID = int.from_bytes(b"wfrelay!", "big")
# A page of a batch: at most this many events. A publisher sends a page in waves of one
# event per workflow (`waves`), and a wave's confirms come back together, so the larger
# the page, the fewer the round trips (RabbitMQ here: 2,900 events/s in waves of 250,
# 4,900 in waves of 1,000). Each page scans the batch's part of workflow_events_tx_idx
# again, so a page that comes back full makes the next one twice as large: a batch of a
# million events (a broker down for minutes under load) takes 20 pages, not 250.
# AMQP's limit on a routing key (a short string).
ROUTING_KEY_MAX_BYTES = 255
PAGE_EVENTS_MIN = 4_000
PAGE_EVENTS_MAX = 64_000


@dataclass(frozen=True)
class RelayEvent:
    """One committed transition of the timeline, as it is published."""

    event_id: int
    workflow_id: UUID
    type: str
    from_state: str | None
    to_state: str
    step_name: str | None
    attempt: int | None
    at: datetime

    @classmethod
    def of(cls, row: Row) -> RelayEvent:
        return cls(**row)

    @property
    def routing_key(self) -> str:
        """`{type}.{to_state}`, the type cut short where the whole would pass AMQP's 255
        bytes (a type is any text a SQL insert gave it; the body holds all of it)."""
        suffix = f".{self.to_state}"
        room = ROUTING_KEY_MAX_BYTES - len(suffix.encode())
        return self.type.encode()[:room].decode(errors="ignore") + suffix

    def body(self) -> bytes:
        """The message: JSON, `event_id` for consumers' deduplication and ordering."""
        document: dict[str, Any] = {
            "event_id": self.event_id,
            "workflow_id": str(self.workflow_id),
            "type": self.type,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "step_name": self.step_name,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
        }
        return json.dumps(document, separators=(",", ":")).encode()


def waves(events: Sequence[RelayEvent]) -> list[list[RelayEvent]]:
    """The events in waves holding at most one event of each workflow, in order: a
    publisher that sends each wave at once and waits for its confirms before the next
    keeps every workflow's events in order, whatever order a wave goes out in."""
    result: list[list[RelayEvent]] = []
    seen: dict[UUID, int] = {}
    for event in events:
        wave = seen.get(event.workflow_id, 0)
        seen[event.workflow_id] = wave + 1
        if wave == len(result):
            result.append([])
        result[wave].append(event)
    return result


class ForeignCursorError(Exception):
    """The stored cursor names transactions this server has not reached: it comes from
    another cluster, whose transaction ids the restored rows and the cursor still hold."""


@dataclass
class RelayCursor:
    """Where a relay stands: every event finished in `published` is out, and of the
    open `batch` every one up to `after_id`."""

    name: str
    published: str
    batch: str | None = None
    after_id: int = 0
    page_events: int = PAGE_EVENTS_MIN

    @classmethod
    async def open(cls, store: Store, name: str) -> RelayCursor:
        """The relay's stored cursor, created at the current snapshot the first time."""
        row = await store.open_relay(name=name)
        return cls(name, row["published"], row["batch"], row["batch_through_id"])

    async def next_page(self, store: Store) -> list[RelayEvent]:
        """The next events to publish, opening a batch at the current snapshot when
        none is open. Empty when the batch holds no more."""
        if self.batch is None:
            batch = await store.current_snapshot()
            if int(snapshot_xmax(batch)) < int(snapshot_xmax(self.published)):
                raise ForeignCursorError(
                    f"the relay's cursor ({self.published}) is ahead of this server's transactions "
                    f"({batch}): it was kept from another cluster (a logical restore?). Events would be "
                    "taken for published and lost, so the relay stops; to start it from now, run "
                    "UPDATE workflow_events SET tx = NULL WHERE tx IS NOT NULL; "
                    "DELETE FROM workflow_event_relays;"
                )
            self.batch, self.after_id = batch, 0
        rows = await store.relay_page(
            published=self.published, batch=self.batch, after_id=self.after_id, limit=self.page_events
        )
        return [RelayEvent.of(row) for row in rows]

    async def confirmed(self, store: Store, events: Sequence[RelayEvent]) -> None:
        """`events`, the last page, are confirmed by the broker: move past them, and
        record it (nothing to record for an empty page)."""
        if len(events) == self.page_events:
            self.after_id = events[-1].event_id
            self.page_events = min(self.page_events * 2, PAGE_EVENTS_MAX)
        else:
            assert self.batch is not None
            self.published, self.batch, self.after_id = self.batch, None, 0
            self.page_events = PAGE_EVENTS_MIN
        if events:
            await store.save_relay_progress(
                name=self.name,
                published=self.published,
                batch=self.batch,
                batch_through_id=self.after_id,
                count=len(events),
            )

    async def lag(self, store: Store) -> tuple[int, float]:
        """Committed events not yet published (up to a million), and the oldest's age."""
        row = await store.relay_lag(published=self.published, batch=self.batch, after_id=self.after_id)
        return int(row["events"]), float(row["seconds"])
