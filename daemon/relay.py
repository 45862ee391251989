"""The event relay: every committed transition of the timeline, published to a message
broker at least once and in order per workflow (WORKFLOWD_EVENTS_URL).

Every daemon configured with a broker runs `run_relay`; the one holding the relay's
advisory lock leads, the others wait to take over. The leader reads the timeline in
commit order (engine/relay.py), hands each page to its `EventPublisher`, and records
the page as published only once the broker has confirmed all of it. A broker that is
down or refuses holds the relay where it is (and the lag grows); a leader killed or cut
off from the database loses the lock with its connection, and the next leader starts
from what was recorded: at most one page is published twice, none is lost. Consumers
deduplicate by `event_id`.

`EventPublisher` is the whole of what the relay asks of a broker; `AmqpPublisher` is
RabbitMQ's (aio-pika). Another broker is another class with the same three methods,
chosen by the URL's scheme in `publisher_for` (README, "Workflow events").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import psycopg
import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange
from pamqp.commands import Basic

from daemon.metrics import Metrics
from engine.primary import connect_to_primary
from engine.relay import RELAY_LOCK_ID, RELAY_NAME, ForeignCursorError, RelayCursor, RelayEvent, waves
from engine.store import Store

LOG = structlog.get_logger("workflowd.relay")

# How often an idle leader looks for newly committed events: the lag of a quiet system.
RELAY_POLL_SECONDS = 0.1
# How often a follower tries to take the lead (a leader killed -9 is replaced within it).
RELAY_FOLLOW_SECONDS = 1.0
# How often the leader measures its lag for the metrics.
RELAY_LAG_SECONDS = 2.0
# The server ends the relay's session after this long without a statement, and so
# releases its lock: a leader that is stopped (SIGSTOP, a frozen VM) but whose kernel
# still answers keepalives would otherwise hold the lead, and halt the relay, for as
# long as it stays stopped. A live leader or follower runs a statement at least every
# RELAY_LAG_SECONDS, whatever the broker does.
RELAY_IDLE_SESSION_SECONDS = 10
# Waits between tries while the broker or the database is away, doubling to the max.
RETRY_DELAY_SECONDS = 0.5
RETRY_DELAY_MAX_SECONDS = 10.0
# A broker that has not confirmed a message within this long has failed the page.
CONFIRM_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0


class PublishFailed(Exception):
    """The broker did not confirm every message of a page; publish it again."""


class EventPublisher(Protocol):
    """A broker, as the relay uses it."""

    async def publish(self, events: Sequence[RelayEvent]) -> None:
        """Return once the broker has durably accepted every event (connecting first
        when not connected), each workflow's events in their order; else raise
        PublishFailed."""

    async def close(self) -> None:
        """Drop the connection; the next publish connects again."""

    def describe(self) -> str:
        """Where events go, for log lines, without credentials."""


class AmqpPublisher:
    """RabbitMQ: persistent messages on a durable topic exchange, with publisher confirms.

    Routing key `{type}.{to_state}`. A message no queue is bound for is dropped by the
    broker, as a topic exchange does: consumers bind their queues (durable, for events
    that must outlive the consumer) before they need the events."""

    def __init__(self, url: str, exchange: str) -> None:
        self._url = url
        self._exchange_name = exchange
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None

    def describe(self) -> str:
        url = urlsplit(self._url)
        where = f"{url.scheme}://{url.hostname}:{url.port or 5672}{url.path or '/'}"
        return f"{where}, exchange {self._exchange_name}"

    async def publish(self, events: Sequence[RelayEvent]) -> None:
        try:
            exchange = await self._connected()
            for wave in waves(events):
                confirms = await asyncio.gather(*(self._send(exchange, event) for event in wave))
                if refused := sum(not isinstance(confirm, Basic.Ack) for confirm in confirms):
                    raise PublishFailed(f"the broker refused {refused} of {len(wave)} messages")
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError,
                TimeoutError) as error:  # fmt: skip
            raise PublishFailed(" ".join(str(error).split()) or type(error).__name__) from error

    async def _connected(self) -> AbstractExchange:
        if self._exchange is None:
            self._connection = await aio_pika.connect(
                self._url,
                timeout=CONNECT_TIMEOUT_SECONDS,
                client_properties={"connection_name": "workflowd-relay"},
            )
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await channel.declare_exchange(
                self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        return self._exchange

    @staticmethod
    async def _send(exchange: AbstractExchange, event: RelayEvent) -> Any:
        message = aio_pika.Message(
            event.body(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(event.event_id),
            timestamp=event.at,
        )
        return await exchange.publish(message, routing_key=event.routing_key, timeout=CONFIRM_TIMEOUT_SECONDS)

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            # Gone already, often: then nothing of ours is left to close.
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
                await connection.close()


def publisher_for(url: str, exchange: str) -> EventPublisher:
    """The publisher of a broker URL (its scheme; settings have checked it)."""
    return AmqpPublisher(url, exchange)


async def run_relay(conninfo: str, publisher: EventPublisher, metrics: Metrics) -> None:
    """Lead the relay whenever this daemon holds its lock; until cancelled."""
    delay = RETRY_DELAY_SECONDS
    while True:
        try:
            async with await connect_to_primary(
                conninfo, autocommit=True, application_name="workflowd-relay"
            ) as conn:
                store = Store(conn)
                await store.pin_hot_plans()
                await store.end_idle_relay_session(RELAY_IDLE_SESSION_SECONDS)
                while not await store.try_relay_lock(RELAY_LOCK_ID):  # noqa: ASYNC110 (polls the database)
                    await asyncio.sleep(RELAY_FOLLOW_SECONDS)
                delay = RETRY_DELAY_SECONDS
                await _lead(store, publisher, metrics)
        except ForeignCursorError as error:
            LOG.critical("relay_stopped", reason=str(error))
            return
        except psycopg.Error as error:
            LOG.warning("relay_database_unavailable", error=" ".join(str(error).split()), retry_in=delay)
        except Exception as error:  # a bug: logged loudly, and the relay goes on, led anew
            LOG.error("relay_crashed", error=repr(error), retry_in=delay, exc_info=error)
        finally:
            _step_down(metrics)
            await publisher.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_DELAY_MAX_SECONDS)


async def _lead(store: Store, publisher: EventPublisher, metrics: Metrics) -> None:
    """Publish, and measure the lag beside it, until either fails."""
    cursor = await RelayCursor.open(store, RELAY_NAME)
    LOG.info("relay_leading", to=publisher.describe(), published=cursor.published)
    metrics.relay_leader.set(1)
    tasks = {
        asyncio.create_task(_publish(store, cursor, publisher, metrics)),
        asyncio.create_task(_measure_lag(store, cursor, metrics)),
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


async def _publish(store: Store, cursor: RelayCursor, publisher: EventPublisher, metrics: Metrics) -> None:
    pending: list[RelayEvent] = []
    broker_delay = RETRY_DELAY_SECONDS
    while True:
        if not pending:
            pending = await cursor.next_page(store)
            if not pending:
                await cursor.confirmed(store, pending)
                await asyncio.sleep(RELAY_POLL_SECONDS)
                continue
        try:
            await publisher.publish(pending)
        except PublishFailed as error:
            LOG.warning(
                "relay_publish_failed", to=publisher.describe(), error=str(error), retry_in=broker_delay
            )
            await publisher.close()
            await asyncio.sleep(broker_delay)
            broker_delay = min(broker_delay * 2, RETRY_DELAY_MAX_SECONDS)
            continue
        broker_delay = RETRY_DELAY_SECONDS
        await cursor.confirmed(store, pending)
        metrics.events_published.inc(len(pending))
        pending = []


async def _measure_lag(store: Store, cursor: RelayCursor, metrics: Metrics) -> None:
    """The lag gauges, every RELAY_LAG_SECONDS; while the broker keeps the publisher
    waiting too, which also keeps the session from being idle (see run_relay)."""
    while True:
        events, seconds = await cursor.lag(store)
        metrics.relay_lag_events.set(events)
        metrics.relay_lag_seconds.set(seconds)
        await asyncio.sleep(RELAY_LAG_SECONDS)


def _step_down(metrics: Metrics) -> None:
    metrics.relay_leader.set(0)
    metrics.relay_lag_events.set(0)
    metrics.relay_lag_seconds.set(0)
