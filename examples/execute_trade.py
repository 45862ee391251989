"""Execute a trade and wait for it to complete (the seed's `workflow.on('completed')`),
then read the seed's `result.output.tradeHash`. Slippage is a fraction: 0.01 is 1 %.

    DATABASE_URL=... python examples/execute_trade.py

A daemon must be running against the same database (`workflowd run` or `workflowd dev`).
"""

from __future__ import annotations

import asyncio
import os

from engine import WorkflowService


async def main() -> None:
    async with WorkflowService.connect(os.environ["DATABASE_URL"]) as service:
        trade = await service.start_workflow(
            "trade_execution",
            {"tokenA": "ETH", "tokenB": "USDC", "amount": 1.5, "slippage": 0.01},
            user_id="example-trader",
        )
        result = await service.wait_for(trade.id, timeout=60)
        print(f"trade {result.id} is {result.state}")
        fill = result.output
        sold, bought = f"{fill['amountIn']} {fill['tokenA']}", f"{fill['amountOut']} {fill['tokenB']}"
        print(f"trade hash {fill['tradeHash']}: {sold} for {bought}")


if __name__ == "__main__":
    asyncio.run(main())
