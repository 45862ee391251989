"""The event relay against the real RabbitMQ broker of the machine (127.0.0.1:5672): the
timeline's transitions come out as messages, each at least once and in order per
workflow, while the relay's leader is killed -9 twice and the broker's application is
stopped and started once."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import aio_pika
import httpx
import psycopg
import pytest

from engine.relay import RELAY_NAME, RelayCursor
from engine.store import Store
from tests.e2e.conftest import Daemon, Daemons, wait_until

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
LEADER = re.compile(r"^workflowd_relay_leader 1\.0$", re.MULTILINE)
WORKFLOWS = 160
RETRYING = 40


@pytest.fixture
def exchange() -> Iterator[tuple[str, str]]:
    """A topic exchange and a durable queue bound to all of it, of this test's own."""
    name = f"workflowd.test.{uuid.uuid4().hex[:8]}"
    queue = f"{name}.all"

    async def declare() -> None:
        connection = await connect()
        async with connection:
            channel = await connection.channel()
            bound = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            await (await channel.declare_queue(queue, durable=True)).bind(bound, "#")

    async def delete() -> None:
        connection = await connect()
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.exchange_delete(name)

    asyncio.run(declare())
    try:
        yield name, queue
    finally:
        asyncio.run(delete())


async def connect() -> aio_pika.abc.AbstractConnection:
    try:
        return await aio_pika.connect(BROKER_URL, timeout=10)
    except OSError as error:
        pytest.fail(f"no RabbitMQ broker at {BROKER_URL} ({error}): .ci/run starts the machine's one")


def drain(queue: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message in the queue: (routing key, body)."""

    async def get_all() -> list[tuple[str, dict[str, Any]]]:
        connection = await connect()
        async with connection:
            channel = await connection.channel()
            source = await channel.get_queue(queue)
            messages = []
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                messages.append((message.routing_key or "", json.loads(message.body)))
            return messages

    return asyncio.run(get_all())


def leader(daemons: Daemons) -> Daemon | None:
    for daemon in daemons.started:
        if daemon.alive:
            try:
                if LEADER.search(httpx.get(f"{daemon.url}/metrics", timeout=2).text):
                    return daemon
            except httpx.HTTPError:
                continue
    return None


def start_relaying(daemons: Daemons, settings: dict[str, str]) -> Daemon:
    """Two daemons publishing to the test's exchange; the one that leads the relay."""
    for _ in range(2):
        daemons.start(**settings)
    return wait_until(lambda: leader(daemons), 20, "a relay leader")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def unpublished(db_url: str) -> int:
    async def count() -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            store = Store(conn)
            return (await (await RelayCursor.open(store, RELAY_NAME)).lag(store))[0]

    return asyncio.run(count())


@pytest.mark.timeout(420)
def test_every_committed_transition_is_published_in_order_through_kills_and_a_broker_restart(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str, exchange: tuple[str, str]
) -> None:
    name, queue = exchange
    settings = {"events_url": BROKER_URL, "events_exchange": name}
    first = start_relaying(daemons, settings)
    db.execute(
        "INSERT INTO workflows (type, input) SELECT 'three_steps', jsonb_build_object('sleep', 0.4, 'n', n) "
        "FROM generate_series(1, %s) n",
        (WORKFLOWS,),
    )
    db.execute(
        "INSERT INTO workflows (type, input) SELECT 'retrying', jsonb_build_object('fail_times', 1, 'n', n) "
        "FROM generate_series(1, %s) n",
        (RETRYING,),
    )
    victims = []
    for _ in range(2):
        time.sleep(2)
        victim = wait_until(lambda: leader(daemons), 20, "a relay leader")
        victim.signal(signal.SIGKILL)
        victims.append(victim)
        daemons.start(**settings)
    assert first in victims
    time.sleep(1)
    assert finished(db) < WORKFLOWS, "the broker must go away while transitions are still being made"
    rabbitmqctl("stop_app")
    time.sleep(3)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")

    wait_until(lambda: finished(db) == WORKFLOWS + RETRYING, 180, "every workflow to complete", interval=0.5)
    wait_until(lambda: unpublished(db_url) == 0, 60, "the relay to catch up", interval=0.5)
    messages = drain(queue)

    assert_published_as_committed(db, messages, WORKFLOWS + RETRYING)
    assert all(daemon.alive for daemon in daemons.started if daemon not in victims)
    # The broker's absence reached the relay, which waited for it rather than skip.
    assert any(event["event"] == "relay_publish_failed" for d in daemons.started for event in d.log_events())


def finished(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone()
    return int(row[0]) if row else 0


def assert_published_as_committed(
    db: psycopg.Connection[Any], messages: list[tuple[str, dict[str, Any]]], workflows: int
) -> None:
    """The messages, first deliveries only, are exactly the timeline, in its order per
    workflow, each with its fields and routing key."""
    timeline = db.execute(
        "SELECT e.id, e.workflow_id::text, w.type, e.from_state, e.to_state, e.step_name, e.attempt "
        "FROM workflow_events e JOIN workflows w ON w.id = e.workflow_id WHERE e.tx IS NOT NULL ORDER BY e.id"
    ).fetchall()
    first_seen: dict[int, dict[str, Any]] = {}
    order: dict[str, list[int]] = defaultdict(list)
    for routing_key, body in messages:
        assert routing_key == f"{body['type']}.{body['to_state']}"
        if body["event_id"] not in first_seen:
            first_seen[body["event_id"]] = body
            order[body["workflow_id"]].append(body["event_id"])
    # Exactly the timeline: nothing lost, nothing that did not commit.
    assert sorted(first_seen) == [row[0] for row in timeline]
    for event_id, workflow_id, type, from_state, to_state, step_name, attempt in timeline:
        body = first_seen[event_id]
        assert (body["workflow_id"], body["type"], body["from_state"], body["to_state"]) == (
            workflow_id, type, from_state, to_state,
        )  # fmt: skip
        assert (body["step_name"], body["attempt"]) == (step_name, attempt)
    # In order per workflow: the first delivery of each event follows the timeline's order.
    expected: dict[str, list[int]] = defaultdict(list)
    for row in timeline:
        expected[row[1]].append(row[0])
    assert order == expected
    assert len(expected) == workflows


@pytest.mark.timeout(180)
def test_a_stopped_leader_loses_the_lead_and_the_relay_goes_on_without_it(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str, exchange: tuple[str, str]
) -> None:
    name, queue = exchange
    stopped = start_relaying(daemons, {"events_url": BROKER_URL, "events_exchange": name})
    stopped.signal(signal.SIGSTOP)  # its kernel still answers: only the idle session gives it away
    db.execute(
        "INSERT INTO workflows (type, input) SELECT 'three_steps', jsonb_build_object('n', n) "
        "FROM generate_series(1, 40) n"
    )
    wait_until(lambda: finished(db) == 40, 60, "the other daemon to run every workflow", interval=0.5)
    wait_until(lambda: unpublished(db_url) == 0, 30, "the relay to go on under a new leader", interval=0.5)
    stopped.signal(signal.SIGCONT)
    # Woken, it finds its session ended by the server, and with it the lead.
    wait_until(lambda: leader(daemons) not in (None, stopped), 10, "the woken daemon to follow")
    assert_published_as_committed(db, drain(queue), 40)
    time.sleep(1)
    assert all(daemon.alive for daemon in daemons.started)
