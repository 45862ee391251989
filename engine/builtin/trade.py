"""Built-in trade_execution: execute_trade -> confirm_trade -> update_portfolio, a saga."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field, field_validator

from engine import PermanentError, Snooze, Step, Workflow, WorkflowContext
from engine.builtin.adapters import Exchange
from engine.builtin.money import Amount, amount_text

# Slippage is a fraction of the price, as the seed and most trading APIs write it
# (0.01 = 1 %). Above half the price no one means a fraction: 1.5 was meant as 1.5 %.
MAX_SLIPPAGE = Decimal("0.5")
DEFAULT_SLIPPAGE = Decimal("0.005")
# A trade the exchange has not settled yet is checked again this much later (a snooze:
# no worker slot is held meanwhile), and given up (then unwound) after this many checks.
SETTLEMENT_CHECK_SECONDS = 2.0
SETTLEMENT_CHECKS_MAX = 300


class TradeInput(BaseModel):
    """The seed's trade request: swap `amount` of tokenA for tokenB, accepting a price
    up to `slippage` (a fraction: 0.01 = 1 %) worse than quoted."""

    tokenA: str = Field(min_length=1, max_length=32)
    tokenB: str = Field(min_length=1, max_length=32)
    amount: Amount
    slippage: Decimal = Field(default=DEFAULT_SLIPPAGE, ge=0, allow_inf_nan=False)

    @field_validator("slippage")
    @classmethod
    def _a_fraction(cls, slippage: Decimal) -> Decimal:
        if slippage > MAX_SLIPPAGE:
            percent = amount_text(slippage)
            raise ValueError(
                f"slippage is a fraction of the price (0.01 = 1 %), at most {MAX_SLIPPAGE}; "
                f"{percent} would be {amount_text(slippage * 100)} %: for {percent} % write "
                f"{amount_text(slippage / 100)}"
            )
        return slippage


class TradeInputInPercent(TradeInput):
    """Version 1's request, for the trades it started before version 2: slippage in
    percent (0.5 = 0.5 %)."""

    slippage: Decimal = Field(default=Decimal("0.5"), ge=0, le=50, allow_inf_nan=False)

    @field_validator("slippage")
    @classmethod
    def _a_fraction(cls, slippage: Decimal) -> Decimal:
        return slippage / 100  # as a fraction, like version 2's


MOVE_POSITION = """
INSERT INTO portfolio_positions (user_id, token, amount) VALUES (%(user)s, %(token)s, %(delta)s)
ON CONFLICT (user_id, token) DO UPDATE
SET amount = portfolio_positions.amount + EXCLUDED.amount, updated_at = now()
"""
RECORD_MOVEMENT = """
INSERT INTO portfolio_movements (workflow_id, kind, user_id, token, delta)
VALUES (%(workflow)s, %(kind)s, %(user)s, %(token)s, %(delta)s)
"""


async def move(ctx: WorkflowContext, kind: str, deltas: Mapping[str, Decimal]) -> dict[str, str]:
    """Book position changes with their movements, in the step's own transaction; returns
    them as outputs carry amounts.

    The movements' primary key (workflow, kind, token) refuses a second booking, so even
    code that ran twice could not apply a change twice; the transaction makes it once.
    """
    assert ctx.connection is not None  # transactional
    user = ctx.user_id or "anonymous"
    for token, delta in deltas.items():
        values = {"workflow": ctx.workflow_id, "kind": kind, "user": user, "token": token, "delta": delta}
        await ctx.connection.execute(RECORD_MOVEMENT, values)
        await ctx.connection.execute(MOVE_POSITION, values)
    return {token: amount_text(delta) for token, delta in deltas.items()}


def exact(value: Any) -> Decimal:
    """An amount from an output: a string since amounts are strings; a float written by
    an earlier release (its repr is the decimal it was meant as)."""
    return Decimal(str(value))


def trade_output(input: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished trade returns: the seed's `tradeHash`, and the fill."""
    trade = outputs["execute_trade"]
    return {
        "tradeHash": trade.get("tradeHash"),  # None for a trade executed by an earlier release
        "tradeId": trade["trade_id"],
        "status": outputs["confirm_trade"]["status"],
        "tokenA": input["tokenA"],
        "tokenB": input["tokenB"],
        "amountIn": amount_text(exact(trade["amount_in"])),
        "amountOut": amount_text(exact(trade["amount_out"])),
        "price": amount_text(exact(trade["price"])),
    }


def trade_executions(exchange: Exchange) -> list[Workflow]:
    """Version 2, slippage as a fraction (the seed's), and version 1, in percent, kept
    for the trades it started until none is left (`workflowd versions`)."""
    return [trade_execution(exchange, TradeInput, 2), trade_execution(exchange, TradeInputInPercent, 1)]


def trade_execution(exchange: Exchange, input_model: type[TradeInput], version: int) -> Workflow:
    """Execute, confirm, book; a failure after execution unwinds the trade and the booking."""

    async def execute_trade(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        trade = input_model.model_validate(input)
        return await exchange.execute_trade(
            trade.tokenA, trade.tokenB, trade.amount, trade.slippage, idempotency_key=ctx.idempotency_key
        )

    async def unwind_trade(
        input: dict[str, Any], output: dict[str, Any], ctx: WorkflowContext
    ) -> dict[str, Any]:
        return await exchange.unwind_trade(output["trade_id"], idempotency_key=ctx.idempotency_key)

    async def confirm_trade(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        trade_id = ctx.outputs["execute_trade"]["trade_id"]
        confirmation = await exchange.confirm_trade(trade_id, idempotency_key=ctx.idempotency_key)
        if confirmation["status"] != "pending":
            return confirmation
        if ctx.attempt >= SETTLEMENT_CHECKS_MAX:
            raise PermanentError(f"trade {trade_id} did not settle after {ctx.attempt} checks")
        raise Snooze(SETTLEMENT_CHECK_SECONDS, f"trade {trade_id} is not settled yet")

    async def update_portfolio(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        trade = ctx.outputs["execute_trade"]
        deltas = {input["tokenA"]: -exact(trade["amount_in"]), input["tokenB"]: exact(trade["amount_out"])}
        return {"booked": await move(ctx, "trade", deltas)}

    async def reverse_portfolio(
        input: dict[str, Any], output: dict[str, Any], ctx: WorkflowContext
    ) -> dict[str, Any]:
        reversed_deltas = {token: -exact(delta) for token, delta in output["booked"].items()}
        return {"reversed": await move(ctx, "reversal", reversed_deltas)}

    return Workflow(
        type="trade_execution",
        name="Trade execution",
        description="Execute a trade, confirm its settlement, update the portfolio; unwind on failure.",
        input_model=input_model,
        version=version,
        requires_compensation=True,
        exact_numbers=True,
        output=trade_output,
        steps=[
            Step("execute_trade", execute_trade, compensate=unwind_trade, timeout=30),
            Step("confirm_trade", confirm_trade, timeout=60),
            Step("update_portfolio", update_portfolio, compensate=reverse_portfolio, transactional=True),
        ],
    )
