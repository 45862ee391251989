"""Built-in trade_execution: execute_trade -> confirm_trade -> update_portfolio, a saga."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from engine import Step, Workflow, WorkflowContext
from engine.builtin.adapters import Exchange


class TradeInput(BaseModel):
    """The seed's trade request; slippage in percent."""

    tokenA: str = Field(min_length=1, max_length=32)
    tokenB: str = Field(min_length=1, max_length=32)
    amount: float = Field(gt=0)
    slippage: float = Field(default=0.5, ge=0, le=50)


MOVE_POSITION = """
INSERT INTO portfolio_positions (user_id, token, amount) VALUES (%(user)s, %(token)s, %(delta)s)
ON CONFLICT (user_id, token) DO UPDATE
SET amount = portfolio_positions.amount + EXCLUDED.amount, updated_at = now()
"""
RECORD_MOVEMENT = """
INSERT INTO portfolio_movements (workflow_id, kind, user_id, token, delta)
VALUES (%(workflow)s, %(kind)s, %(user)s, %(token)s, %(delta)s)
"""


async def move(ctx: WorkflowContext, kind: str, deltas: dict[str, float]) -> None:
    """Book position changes with their movements, in the step's own transaction.

    The movements' primary key (workflow, kind, token) refuses a second booking, so even
    code that ran twice could not apply a change twice; the transaction makes it once.
    """
    assert ctx.connection is not None  # transactional
    user = ctx.user_id or "anonymous"
    for token, delta in deltas.items():
        values = {"workflow": ctx.workflow_id, "kind": kind, "user": user, "token": token, "delta": delta}
        await ctx.connection.execute(RECORD_MOVEMENT, values)
        await ctx.connection.execute(MOVE_POSITION, values)


def trade_execution(exchange: Exchange) -> Workflow:
    """Execute, confirm, book; a failure after execution unwinds the trade and the booking."""

    async def execute_trade(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        return await exchange.execute_trade(
            input["tokenA"], input["tokenB"], float(input["amount"]), float(input.get("slippage", 0.5)),
            idempotency_key=ctx.idempotency_key,
        )  # fmt: skip

    async def unwind_trade(
        input: dict[str, Any], output: dict[str, Any], ctx: WorkflowContext
    ) -> dict[str, Any]:
        return await exchange.unwind_trade(output["trade_id"], idempotency_key=ctx.idempotency_key)

    async def confirm_trade(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        trade = ctx.outputs["execute_trade"]
        return await exchange.confirm_trade(trade["trade_id"], idempotency_key=ctx.idempotency_key)

    async def update_portfolio(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        trade = ctx.outputs["execute_trade"]
        deltas = {input["tokenA"]: -trade["amount_in"], input["tokenB"]: trade["amount_out"]}
        await move(ctx, "trade", deltas)
        return {"booked": deltas}

    async def reverse_portfolio(
        input: dict[str, Any], output: dict[str, Any], ctx: WorkflowContext
    ) -> dict[str, Any]:
        reversed_deltas = {token: -delta for token, delta in output["booked"].items()}
        await move(ctx, "reversal", reversed_deltas)
        return {"reversed": reversed_deltas}

    return Workflow(
        type="trade_execution",
        name="Trade execution",
        description="Execute a trade, confirm its settlement, update the portfolio; unwind on failure.",
        input_model=TradeInput,
        requires_compensation=True,
        steps=[
            Step("execute_trade", execute_trade, compensate=unwind_trade, timeout=30),
            Step("confirm_trade", confirm_trade, timeout=60),
            Step("update_portfolio", update_portfolio, compensate=reverse_portfolio, transactional=True),
        ],
    )
