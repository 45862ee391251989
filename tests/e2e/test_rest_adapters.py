"""The exchange and the notifier over REST, against simulated services on loopback
(tests/fakes.py): exact amounts, idempotency keys, and which answers are retried."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from engine import PermanentError, WorkflowState
from engine.builtin.http_clients import RestExchange, RestNotifier, ServiceUnavailableError
from tests.e2e.conftest import Daemons, run
from tests.fakes import (
    PRICE,
    Behaviour,
    ExchangeBook,
    fake_exchange,
    fake_notifier,
    serving,
)

TOKEN_AMOUNT = "1.000000000000000001"  # 18 decimals: a float would make it 1.0


@pytest.fixture
def exchange() -> Iterator[tuple[str, Behaviour, ExchangeBook]]:
    behaviour, book = Behaviour(), ExchangeBook()
    with serving(fake_exchange(behaviour, book)) as url:
        yield url, behaviour, book


@pytest.fixture
def notifier() -> Iterator[tuple[str, Behaviour, list[dict[str, Any]]]]:
    behaviour, delivered = Behaviour(), list[dict[str, Any]]()
    with serving(fake_notifier(behaviour, delivered)) as url:
        yield url, behaviour, delivered


def test_the_exchange_client_trades_with_exact_amounts_and_tells_errors_apart(
    exchange: tuple[str, Behaviour, ExchangeBook],
) -> None:
    url, behaviour, book = exchange

    async def scenario() -> None:
        client = RestExchange(url, "ex-key", timeout=5)
        try:
            trade = await client.execute_trade(
                "ETH", "USDC", Decimal(TOKEN_AMOUNT), Decimal("0.01"), idempotency_key="k1"
            )
            assert trade["amount_in"] == TOKEN_AMOUNT
            assert Decimal(trade["amount_out"]) == Decimal(TOKEN_AMOUNT) * PRICE  # every digit
            assert trade["tradeHash"].startswith("0x")
            assert await client.confirm_trade(trade["trade_id"], idempotency_key="k2") == {
                "trade_id": trade["trade_id"], "status": "settled",
            }  # fmt: skip
            tight = await client.execute_trade(
                "ETH", "DAI", Decimal(1), Decimal("0.0001"), idempotency_key="k3"
            )
            with pytest.raises(PermanentError, match="did not settle"):
                await client.confirm_trade(tight["trade_id"], idempotency_key="k4")
            assert (await client.unwind_trade(tight["trade_id"], idempotency_key="k5"))["status"] == "unwound"
            for status in (503, 429):
                behaviour.failures["trades"] = [status]
                with pytest.raises(ServiceUnavailableError, match=str(status)):
                    await client.execute_trade("ETH", "USDC", Decimal(1), Decimal(0), idempotency_key="k6")
            for status in (400, 409):  # only 5xx and 429 are retried
                behaviour.failures["trades"] = [status]
                with pytest.raises(PermanentError, match=str(status)):
                    await client.execute_trade("ETH", "USDC", Decimal(1), Decimal(0), idempotency_key="k6")
            behaviour.lost_answers["trades"], behaviour.lost_answer_seconds = 1, 1.0
            lost = RestExchange(url, "ex-key", timeout=0.2)
            with pytest.raises(ServiceUnavailableError, match="no answer in time"):
                await lost.execute_trade("ETH", "USDC", Decimal(2), Decimal(0), idempotency_key="k7")
            await lost.aclose()
            # The retry with the same key gets the trade the lost answer was about.
            again = await client.execute_trade("ETH", "USDC", Decimal(2), Decimal(0), idempotency_key="k7")
            assert again["trade_id"] == "t3"
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert len(book.trades) == 3
    assert {request["name"] for request in behaviour.requests} == {"trades", "confirm", "unwind"}


def test_the_notifier_client_delivers_once_per_key_and_refuses_unknown_users(
    notifier: tuple[str, Behaviour, list[dict[str, Any]]],
) -> None:
    url, behaviour, delivered = notifier

    async def scenario() -> None:
        client = RestNotifier(url, "n-key", timeout=5)
        try:
            behaviour.failures["notifications"] = [502]
            with pytest.raises(ServiceUnavailableError, match="502"):
                await client.notify("alice", "hello", idempotency_key="n1")
            await client.notify("alice", "hello", idempotency_key="n1")
            await client.notify("alice", "hello", idempotency_key="n1")
            with pytest.raises(PermanentError, match="404"):
                await client.notify("unknown-bob", "hello", idempotency_key="n2")
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert delivered == [{"key": "n1", "userId": "alice", "message": "hello"}]


def test_a_daemon_trades_and_grants_over_rest_with_retries(
    daemons: Daemons,
    db_url: str,
    db: psycopg.Connection[Any],
    exchange: tuple[str, Behaviour, ExchangeBook],
    notifier: tuple[str, Behaviour, list[dict[str, Any]]],
    chain_service: tuple[str, Behaviour],
    ai_service: tuple[str, Behaviour],
) -> None:
    exchange_url, exchange_behaviour, book = exchange
    notifier_url, notifier_behaviour, delivered = notifier
    exchange_behaviour.failures["trades"] = [503]
    notifier_behaviour.failures["notifications"] = [429]
    book.checks_to_settle = 2  # pending at the first check: the step snoozes, then confirms
    daemons.start(
        adapters="http", chain_rpc_url=chain_service[0], chain_private_key="0x" + "2b" * 32,
        ai_base_url=ai_service[0], ai_api_key="sk", exchange_url=exchange_url, exchange_api_key="ex",
        notifier_url=notifier_url, notifier_api_key="n",
    )  # fmt: skip
    trade, grant, refused = run(db_url, [
        ("trade_execution", {"tokenA": "ETH", "tokenB": "USDC", "amount": TOKEN_AMOUNT, "slippage": 0.01}, "t"),
        ("reward_grant", {"amount": "0.1", "reason": "welcome"}, "alice"),
        ("reward_grant", {"amount": "0.2", "reason": "welcome"}, "unknown-bob"),
    ])  # fmt: skip

    assert trade.state is WorkflowState.COMPLETED
    assert trade.output["amountIn"] == TOKEN_AMOUNT
    assert Decimal(trade.output["amountOut"]) == Decimal(TOKEN_AMOUNT) * PRICE
    assert len(book.trades) == 1, "the retry after a 503 made no second trade"
    confirm = db.execute(
        "SELECT attempt, retry_count FROM workflow_steps WHERE step_name = 'confirm_trade'"
    ).fetchone()
    assert confirm == (2, 0)  # a snooze, not a retry
    snoozed = db.execute("SELECT error->>'message' FROM workflow_events WHERE to_state = 'pending' "
                         "AND step_name = 'confirm_trade'").fetchall()  # fmt: skip
    assert snoozed == [(f"trade {next(iter(book.trades))} is not settled yet",)]
    keys = exchange_behaviour.keys("trades")
    assert len(keys) == 2
    assert len(set(keys)) == 1
    assert grant.state is WorkflowState.COMPLETED
    assert grant.output["amount"] == "0.1"
    assert [message["userId"] for message in delivered] == ["alice"]
    assert refused.state is WorkflowState.COMPENSATED  # the unknown user's grant is revoked
    ledger = db.execute("SELECT user_id, amount::text, status FROM reward_grants ORDER BY user_id").fetchall()
    assert ledger == [("alice", "0.1", "granted"), ("unknown-bob", "0.2", "revoked")]
