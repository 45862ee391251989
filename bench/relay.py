"""The event relay under the bench's load: a 1-step drain by 2 daemons that publish
every transition to RabbitMQ (a durable queue bound to all of the exchange, as a
consumer would have it), beside the same drain without the relay. How fast the relay
publishes, how far it falls behind while the daemons run, how long after the last
completion its last event is confirmed, and what it costs the drain. And, at a steady
rate of starts after idle, how long an event takes from its transaction to a consumer."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from datetime import datetime
from typing import Any

import aio_pika
import psycopg

from bench.daemon import daemons, fresh_database, throughput
from bench.primary import PrimaryCost
from daemon.local_postgres import LocalPostgres
from engine.relay import RELAY_NAME, RelayCursor
from engine.store import Store

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
LAG_SAMPLE_SECONDS = 0.25
INSERTS_PER_SECOND = 100
# Claimed (pending to running), the step started and succeeded, the workflow completed.
EVENTS_PER_NOOP_1 = 4
CATCH_UP_TIMEOUT_SECONDS = 600


def relay_drain(
    cluster: LocalPostgres, workflows: int, concurrency: int, broker_url: str = BROKER_URL
) -> dict[str, Any]:
    """The drain with the relay on, then without it, on fresh databases of the cluster."""
    exchange = f"workflowd.bench.{uuid.uuid4().hex[:8]}"
    asyncio.run(_bind_queue(broker_url, exchange))
    try:
        on = _drain_with_relay(cluster, workflows, concurrency, broker_url, exchange)
    finally:
        asyncio.run(_delete_queue(broker_url, exchange))
    off = throughput(cluster, 2, workflows, concurrency, 1)
    return {
        **on,
        "without_relay_steps_per_s": off["steps_per_s"],
        "with_over_without": round(on["steps_per_s"] / off["steps_per_s"], 2),
        "without_relay_wal_bytes_per_workflow": off["wal_bytes_per_workflow"],
    }


def relay_steady(
    cluster: LocalPostgres, rate: int, seconds: float, concurrency: int, broker_url: str = BROKER_URL
) -> dict[str, Any]:
    """Idle daemons with the relay on, then `rate` one-step workflows a second inserted
    for `seconds` (one INSERT every 10 ms): the delay of each event from its
    transaction's start (`at`) to a consumer's receipt of its message, over every event."""
    exchange = f"workflowd.bench.{uuid.uuid4().hex[:8]}"
    asyncio.run(_bind_queue(broker_url, exchange))
    try:
        url = fresh_database(cluster, "bench_relay_steady")
        asyncio.run(_open_cursor(url))
        settings = {"WORKFLOWD_EVENTS_URL": broker_url, "WORKFLOWD_EVENTS_EXCHANGE": exchange}
        with daemons(url, 2, concurrency, settings=settings):
            time.sleep(2)  # idle first: the leader polls an empty timeline
            delays = asyncio.run(_insert_and_receive(url, broker_url, exchange, rate, seconds))
    finally:
        asyncio.run(_delete_queue(broker_url, exchange))
    delays.sort()
    return {
        "workflows_per_s": rate,
        "events": len(delays),
        "delay_p50_ms": round(1000 * delays[len(delays) // 2], 1),
        "delay_p99_ms": round(1000 * delays[int(len(delays) * 0.99)], 1),
        "delay_max_ms": round(1000 * delays[-1], 1),
    }


async def _insert_and_receive(
    url: str, broker_url: str, exchange: str, rate: int, seconds: float
) -> list[float]:
    per_insert = max(1, rate // INSERTS_PER_SECOND)
    inserts = int(seconds * INSERTS_PER_SECOND)
    expected = EVENTS_PER_NOOP_1 * per_insert * inserts
    delays: list[float] = []
    async with await aio_pika.connect(broker_url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(exchange)

        async def receive() -> None:
            async with queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    at = datetime.fromisoformat(json.loads(message.body)["at"])
                    delays.append(time.time() - at.timestamp())
                    if len(delays) >= expected:
                        return

        receiving = asyncio.create_task(receive())
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            started = time.monotonic()
            for n in range(inserts):
                await conn.execute(
                    "INSERT INTO workflows (type, input) SELECT 'noop_1', jsonb_build_object('n', %s::int * 1000 + g) "
                    "FROM generate_series(1, %s) g",
                    (n, per_insert),
                )
                await asyncio.sleep(max(0.0, started + (n + 1) / INSERTS_PER_SECOND - time.monotonic()))
        await asyncio.wait_for(receiving, CATCH_UP_TIMEOUT_SECONDS)
    return delays


def _drain_with_relay(
    cluster: LocalPostgres, workflows: int, concurrency: int, broker_url: str, exchange: str
) -> dict[str, Any]:
    name = "bench_relay"
    url = fresh_database(cluster, name)
    asyncio.run(_open_cursor(url))  # the relay publishes every event from here on
    lags: list[tuple[int, float]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workflows (type, input) SELECT 'noop_1', jsonb_build_object('n', n) "
            "FROM generate_series(1, %s) n",
            (workflows,),
        )
        cost = PrimaryCost(cluster, name)
        settings = {"WORKFLOWD_EVENTS_URL": broker_url, "WORKFLOWD_EVENTS_EXCHANGE": exchange}
        with daemons(url, 2, concurrency, settings=settings):
            cost.start(conn)
            while _runnable(conn):
                cost.sample(conn)
                lags.append(_lag(url))
                time.sleep(LAG_SAMPLE_SECONDS)
            deadline = time.monotonic() + CATCH_UP_TIMEOUT_SECONDS
            while _lag(url)[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            caught_up = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        primary = cost.finish(conn, workflows, 1)
        started, completed, events = conn.execute(
            "SELECT min(started_at), max(completed_at), (SELECT count(*) FROM workflow_events) FROM workflows"
        ).fetchone()  # type: ignore[misc]
    drain = (completed - started).total_seconds()
    relayed = (caught_up - started).total_seconds()
    return {
        "steps_per_s": round(workflows / drain),
        "events": events,
        "events_per_s": round(events / relayed),
        "lag_seconds_median": round(statistics.median(seconds for _, seconds in lags), 3) if lags else 0,
        "lag_seconds_max": round(max((seconds for _, seconds in lags), default=0), 3),
        "lag_events_max": max((count for count, _ in lags), default=0),
        "caught_up_after_last_completion_s": round((caught_up - completed).total_seconds(), 2),
        "wal_bytes_per_workflow": primary["wal_bytes_per_workflow"],
        "server_cpu_ms_per_workflow": primary["server_cpu_ms_per_workflow"],
    }


def _runnable(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM workflows WHERE state IN ('pending', 'running', 'compensating'))"
    ).fetchone()
    return bool(row and row[0])


def _lag(url: str) -> tuple[int, float]:
    """Events committed and not yet confirmed by the broker, and the oldest one's age."""

    async def measure() -> tuple[int, float]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            store = Store(conn)
            return await (await RelayCursor.open(store, RELAY_NAME)).lag(store)

    return asyncio.run(measure())


async def _open_cursor(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await RelayCursor.open(Store(conn), RELAY_NAME)


async def _bind_queue(broker_url: str, exchange: str) -> None:
    async with await aio_pika.connect(broker_url) as connection:
        channel = await connection.channel()
        bound = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await (await channel.declare_queue(exchange, durable=True)).bind(bound, "#")


async def _delete_queue(broker_url: str, exchange: str) -> None:
    async with await aio_pika.connect(broker_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(exchange)
        await channel.exchange_delete(exchange)
