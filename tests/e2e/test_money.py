"""Exact money: amounts given as JSON numbers (by SQL, HTTP and the CLI) or decimal
strings (Python) are booked and reversed to the last digit, never through a float."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from decimal import Decimal
from typing import Any

import httpx
import psycopg

from engine import WorkflowRecord, WorkflowService, WorkflowState
from tests.e2e.conftest import ROOT, Daemons

TOKEN = "money-test-token-" + "x" * 32
WEI = "0.000000000000000001"  # a token's smallest unit: a float cannot add it to 1
TOKEN_AMOUNT = "1.000000000000000001"


def positions(db: psycopg.Connection[Any], user: str) -> dict[str, str]:
    rows = db.execute("SELECT token, amount::text FROM portfolio_positions WHERE user_id = %s", (user,))
    return dict(rows.fetchall())


def finished(db_url: str, count: int) -> list[WorkflowRecord]:
    async def scenario() -> list[WorkflowRecord]:
        async with WorkflowService.connect(db_url) as service:
            listed = await service.list_workflows(limit=100)
            return [await service.wait_for(workflow.id, timeout=60) for workflow in listed.items]

    workflows = asyncio.run(scenario())
    assert len(workflows) == count
    return workflows


def test_amounts_are_booked_to_the_last_digit_from_every_way_in(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start(admin_token=TOKEN)
    # Plain SQL, with JSON numbers: 0.1 + 0.2, and an 18-decimal amount.
    for amount in ("0.1", "0.2", TOKEN_AMOUNT):
        db.execute(
            "INSERT INTO workflows (type, input, user_id) VALUES ('trade_execution', %s::jsonb, 'sql')",
            (f'{{"tokenA": "ETH", "tokenB": "USDC", "amount": {amount}, "slippage": 0.01}}',),
        )
        db.execute(
            "INSERT INTO workflows (type, input, user_id) VALUES ('reward_grant', %s::jsonb, 'sql')",
            (f'{{"amount": {amount}, "reason": "r{amount}"}}',),
        )
    # HTTP and the CLI, with a JSON number each: a JSON parser with floats would drop the wei.
    body = f'{{"type": "trade_execution", "user_id": "http", "input": {{"tokenA": "ETH", "tokenB": "USDC", "amount": {TOKEN_AMOUNT}}}}}'
    answer = httpx.post(f"{daemon.url}/admin/workflows", content=body,
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
    assert answer.status_code == 201, answer.text
    subprocess.run(
        [sys.executable, "-m", "daemon", "start", "trade_execution", "--user", "cli",
         "--input", f'{{"tokenA": "ETH", "tokenB": "USDC", "amount": {TOKEN_AMOUNT}}}'],
        env={**os.environ, "DATABASE_URL": db_url}, cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip

    # A number beyond PostgreSQL's numeric, read exactly, is refused in one line, fast: as
    # a Decimal it would otherwise have been written out as a billion digits.
    huge = '{"type": "trade_execution", "input": {"tokenA": "ETH", "tokenB": "USDC", "amount": 1e999999999}}'
    refused = httpx.post(f"{daemon.url}/admin/workflows", content=huge, timeout=5,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
    assert refused.status_code == 422
    assert "beyond the range of PostgreSQL's numeric" in refused.json()["detail"]
    cli = subprocess.run(
        [sys.executable, "-m", "daemon", "start", "trade_execution", "--user", "cli", "--input", '{"amount": 1e-99999}'],
        env={**os.environ, "DATABASE_URL": db_url}, cwd=ROOT, check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert cli.returncode == 2  # an argument error: argparse's usage, then the one line
    assert (
        "argument --input: '{\"amount\": 1e-99999}' cannot be stored: 1E-99999 is beyond the range of "
        "PostgreSQL's numeric" in cli.stderr.strip().splitlines()[-1]
    )
    assert "Traceback" not in cli.stderr

    # Python, with decimal strings and a Decimal.
    async def start_from_python() -> None:
        async with WorkflowService.connect(db_url) as service:
            for amount in ("0.1", Decimal("0.2"), WEI):
                input = {"tokenA": "ETH", "tokenB": "USDC", "amount": amount, "slippage": "0.01"}
                await service.start_workflow("trade_execution", input, "python")

    asyncio.run(start_from_python())
    workflows = finished(db_url, 11)

    assert {workflow.state for workflow in workflows} == {WorkflowState.COMPLETED}
    assert positions(db, "sql")["ETH"] == "-1.300000000000000001"
    assert positions(db, "http")["ETH"] == f"-{TOKEN_AMOUNT}"
    assert positions(db, "cli")["ETH"] == f"-{TOKEN_AMOUNT}"
    assert positions(db, "python")["ETH"] == "-0.300000000000000001"
    # What each trade booked is what its output says, digit for digit.
    for workflow in workflows:
        if workflow.type == "trade_execution":
            booked = db.execute(
                "SELECT delta::text FROM portfolio_movements WHERE workflow_id = %s AND token = 'USDC'",
                (workflow.id,),
            ).fetchone()
            assert booked == (workflow.output["amountOut"],)
            filled = Decimal(workflow.output["amountIn"]) * Decimal(workflow.output["price"])
            assert Decimal(workflow.output["amountOut"]) == filled.quantize(Decimal(WEI))  # to the wei

    grants = db.execute("SELECT sum(amount)::text FROM reward_grants WHERE user_id = 'sql'").fetchone()
    assert grants == ("1.300000000000000001",)
    amounts = {workflow.output["amount"] for workflow in workflows if workflow.type == "reward_grant"}
    assert amounts == {"0.1", "0.2", TOKEN_AMOUNT}


def test_a_reversed_booking_leaves_every_position_at_exactly_zero(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    amounts = ("0.1", "0.2", TOKEN_AMOUNT, WEI)

    async def trade() -> list[WorkflowRecord]:
        async with WorkflowService.connect(db_url) as service:
            trades = [
                await service.start_workflow(
                    "trade_execution", {"tokenA": "ETH", "tokenB": "USDC", "amount": amount}, "reverser"
                )
                for amount in amounts
            ]
            return [await service.wait_for(trade.id, timeout=30) for trade in trades]

    done = asyncio.run(trade())
    assert {trade.state for trade in done} == {WorkflowState.COMPLETED}
    assert positions(db, "reverser")["ETH"] == "-1.300000000000000002"
    # Stage an operator's case: each trade failed after its booking, and is compensated.
    db.execute("UPDATE workflows SET state = 'failed' WHERE id = ANY(%s)", ([trade.id for trade in done],))

    async def compensate() -> list[WorkflowRecord]:
        async with WorkflowService.connect(db_url) as service:
            for trade in done:
                await service.compensate_workflow(trade.id)
            return [await service.wait_for(trade.id, timeout=30) for trade in done]

    assert {trade.state for trade in asyncio.run(compensate())} == {WorkflowState.COMPENSATED}
    assert positions(db, "reverser") == {"ETH": "0.000000000000000000", "USDC": "0.000000000000000000"}
    reversals = db.execute(
        "SELECT sum(delta)::text FROM portfolio_movements WHERE user_id = 'reverser' AND kind = 'reversal' "
        "AND token = 'ETH'"
    ).fetchone()
    assert reversals == ("1.300000000000000002",)
