"""Execute a trade and wait for it to complete (the seed's `workflow.on('completed')`).

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
            {"tokenA": "ETH", "tokenB": "USDC", "amount": 1.5, "slippage": 0.5},
            user_id="example-trader",
        )
        finished = await service.wait_for(trade.id, timeout=60)
        print(f"trade {finished.id} is {finished.state}: {finished.output}")


if __name__ == "__main__":
    asyncio.run(main())
