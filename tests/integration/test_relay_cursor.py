"""The relay's cursor over the timeline against a real database (engine/relay.py,
migration 0020): events come out in commit order, none is skipped when a lower id
commits last or a transaction rolls back, progress survives a restart, an idle relay
writes nothing, and the page query keeps its index plan whatever the statistics say."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
import pytest

from engine.relay import PAGE_EVENTS_MIN, ForeignCursorError, RelayCursor, RelayEvent, waves
from engine.store import Store
from tests.factories import insert_workflow


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        yield Store(conn)


def add_event(conn: psycopg.Connection[Any], workflow_id: UUID, to_state: str) -> int:
    row = conn.execute(
        "INSERT INTO workflow_events (workflow_id, from_state, to_state) VALUES (%s, 'pending', %s) RETURNING id",
        (workflow_id, to_state),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def drain(store: Store, cursor: RelayCursor) -> list[RelayEvent]:
    """Every event the cursor gives until a page comes back empty, each page confirmed."""
    out: list[RelayEvent] = []
    while page := await cursor.next_page(store):
        out += page
        await cursor.confirmed(store, page)
    await cursor.confirmed(store, page)
    return out


async def test_a_lower_id_that_commits_last_is_published_in_a_later_batch(
    store: Store, db: psycopg.Connection[Any], db_url: str
) -> None:
    cursor = await RelayCursor.open(store, "test")
    workflow = insert_workflow(db, type="relayed")
    with psycopg.connect(db_url) as slow, psycopg.connect(db_url) as doomed:
        early = add_event(slow, workflow["id"], "slow")  # takes its id first, commits last
        add_event(doomed, workflow["id"], "rolled_back")
        quick = add_event(db, workflow["id"], "quick")
        assert early < quick
        assert [e.event_id for e in await drain(store, cursor)] == [quick]
        doomed.rollback()
        slow.commit()
    later = await drain(store, cursor)
    assert [(e.event_id, e.to_state, e.type) for e in later] == [(early, "slow", "relayed")]
    assert await drain(store, cursor) == []


async def test_progress_is_stored_and_a_new_cursor_resumes_after_it(
    store: Store, db: psycopg.Connection[Any]
) -> None:
    cursor = await RelayCursor.open(store, "test")
    workflow = insert_workflow(db, type="relayed")
    ids = [add_event(db, workflow["id"], f"s{n}") for n in range(PAGE_EVENTS_MIN + 10)]
    page = await cursor.next_page(store)
    assert [e.event_id for e in page] == ids[:PAGE_EVENTS_MIN]
    await cursor.confirmed(store, page)  # a full page: the batch is open, stored with its place
    # A relay killed here: the next one starts from what was stored.
    resumed = await RelayCursor.open(store, "test")
    assert [e.event_id for e in await drain(store, resumed)] == ids[PAGE_EVENTS_MIN:]
    stored = db.execute(
        "SELECT batch IS NULL, batch_through_id, published_count FROM workflow_event_relays"
    ).fetchone()
    assert stored == (True, 0, len(ids))
    assert await drain(store, await RelayCursor.open(store, "test")) == []


async def test_an_idle_relay_writes_nothing(store: Store, db: psycopg.Connection[Any]) -> None:
    cursor = await RelayCursor.open(store, "test")
    before = db.execute("SELECT xmin::text, updated_at FROM workflow_event_relays").fetchone()
    for _ in range(3):
        assert await drain(store, cursor) == []
    assert db.execute("SELECT xmin::text, updated_at FROM workflow_event_relays").fetchone() == before


async def test_events_committed_before_the_relay_first_ran_are_history(
    store: Store, db: psycopg.Connection[Any]
) -> None:
    workflow = insert_workflow(db, type="relayed")
    add_event(db, workflow["id"], "before")
    cursor = await RelayCursor.open(store, "test")
    after = add_event(db, workflow["id"], "after")
    assert [e.event_id for e in await drain(store, cursor)] == [after]


async def test_a_cursor_kept_from_another_cluster_stops_the_relay_rather_than_skip(
    store: Store, db: psycopg.Connection[Any]
) -> None:
    await RelayCursor.open(store, "test")
    # As after a logical restore into a new cluster: the cursor's snapshot is beyond
    # every transaction id this server has given.
    db.execute("UPDATE workflow_event_relays SET published = '900000000:900000000:'")
    cursor = await RelayCursor.open(store, "test")
    add_event(db, insert_workflow(db, type="relayed")["id"], "after_the_restore")
    with pytest.raises(ForeignCursorError, match="DELETE FROM workflow_event_relays"):
        await cursor.next_page(store)


async def test_lag_counts_the_committed_events_not_yet_confirmed(
    store: Store, db: psycopg.Connection[Any]
) -> None:
    cursor = await RelayCursor.open(store, "test")
    workflow = insert_workflow(db, type="relayed")
    for n in range(5):
        add_event(db, workflow["id"], f"s{n}")
    events, seconds = await cursor.lag(store)
    assert events == 5
    assert seconds >= 0
    await drain(store, cursor)
    assert await cursor.lag(store) == (0, 0.0)


def test_waves_keep_each_workflows_events_in_order() -> None:
    a, b = UUID(int=1), UUID(int=2)
    events = [_event(1, a), _event(2, b), _event(3, a), _event(4, a), _event(5, b)]
    assert [[e.event_id for e in wave] for wave in waves(events)] == [[1, 2], [3, 5], [4]]


def test_a_routing_key_fits_amqps_limit_whatever_the_type() -> None:
    assert _event(1, UUID(int=1)).routing_key == "t.running"
    long = _event(1, UUID(int=1), type="é" * 300)
    assert long.routing_key.endswith(".running")
    assert len(long.routing_key.encode()) <= 255
    assert long.routing_key.startswith("é" * 10)
    assert json.loads(long.body())["type"] == "é" * 300


def _event(event_id: int, workflow_id: UUID, type: str = "t") -> RelayEvent:
    return RelayEvent(event_id, workflow_id, type, None, "running", None, None, datetime.now(UTC))
