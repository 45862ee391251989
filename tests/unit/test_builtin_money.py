"""The money types' rules without a database: slippage as a fraction, amounts exact
from every spelling, the sandbox's fills to the last digit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from engine import InputValidationError
from engine.builtin import builtin_workflows, sandbox_adapters
from engine.builtin.money import amount_text
from engine.builtin.trade import TradeInput, TradeInputInPercent

TRADE = {"tokenA": "ETH", "tokenB": "USDC"}
ROOT = Path(__file__).parents[2]


def trade_definition(version: int) -> object:
    (definition,) = [
        workflow for workflow in builtin_workflows(sandbox_adapters())
        if workflow.type == "trade_execution" and workflow.version == version
    ]  # fmt: skip
    return definition


def test_the_seeds_trade_is_valid_and_its_slippage_a_fraction() -> None:
    trade = TradeInput.model_validate(TRADE | {"amount": 1.5, "slippage": 0.01})
    assert trade.slippage == Decimal("0.01")
    assert TradeInput.model_validate(TRADE | {"amount": 1}).slippage == Decimal("0.005")


@pytest.mark.parametrize(("slippage", "meant"), [(1.5, "0.015"), (1, "0.01"), (50, "0.5")])
def test_a_slippage_given_in_percent_is_refused_with_what_was_meant(slippage: float, meant: str) -> None:
    with pytest.raises(InputValidationError, match=f"for {slippage:g} % write {meant}"):
        trade_definition(2).validate_input(TRADE | {"amount": 1, "slippage": slippage})  # type: ignore[attr-defined]


def test_version_1_kept_its_percent_for_the_trades_it_started() -> None:
    assert TradeInputInPercent.model_validate(TRADE | {"amount": 1, "slippage": 0.5}).slippage == Decimal(
        "0.005"
    )
    with pytest.raises(ValueError, match="less than or equal to 50"):
        TradeInputInPercent.model_validate(TRADE | {"amount": 1, "slippage": 60})


@pytest.mark.parametrize("spelling", ["0.1", 0.1, Decimal("0.1"), "1e-1"])
def test_an_amount_is_exact_however_it_is_spelt(spelling: object) -> None:
    assert TradeInput.model_validate(TRADE | {"amount": spelling}).amount == Decimal("0.1")


@pytest.mark.parametrize(
    ("amount", "error"),
    [("0.0000000000000000001", "18 decimal places"), ("0", "greater than 0"), ("NaN", "finite"),
     (True, "decimal"), ("1,5", "valid decimal")],
)  # fmt: skip
def test_an_amount_that_is_not_money_is_refused(amount: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        TradeInput.model_validate(TRADE | {"amount": amount})


def test_the_money_types_read_json_numbers_as_decimals() -> None:
    stored = '{"amount": 1.000000000000000001, "n": 3}'
    trade = trade_definition(2)
    assert trade.read_json(stored) == {"amount": Decimal("1.000000000000000001"), "n": 3}  # type: ignore[attr-defined]
    assert json.loads(stored)["amount"] == 1.0  # what a float would have made of it


def test_the_sandbox_fills_to_the_last_digit() -> None:
    amount = Decimal("1.000000000000000001")
    fill = asyncio.run(
        sandbox_adapters().exchange.execute_trade("ETH", "USDC", amount, Decimal("0.01"), idempotency_key="k")
    )
    assert fill["amount_in"] == "1.000000000000000001"
    assert Decimal(fill["amount_out"]) == (amount * Decimal(fill["price"])).quantize(Decimal("1e-18"))
    assert amount_text(Decimal("2.50")) == "2.5"
    assert amount_text(Decimal("1E+2")) == "100"


def test_the_signing_library_leaves_the_recursion_limit_alone() -> None:
    # py_ecc, imported by eth-account, raises it to 100,000: a daemon must keep its own,
    # or a deeply nested JSON value could overflow its C stack instead of being refused.
    program = (
        "import sys; before = sys.getrecursionlimit()\n"
        "from engine.builtin.http_clients import eth_account_library\n"
        "eth_account_library().Account.create()\n"
        "assert sys.getrecursionlimit() == before, sys.getrecursionlimit()\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, cwd=ROOT)
