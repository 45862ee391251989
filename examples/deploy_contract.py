"""Start a contract deployment and watch its progress percentage (the seed's example).

    DATABASE_URL=... python examples/deploy_contract.py

A daemon must be running against the same database (`workflowd run` or `workflowd dev`).
"""

from __future__ import annotations

import asyncio
import os

from engine import WorkflowService

FINISHED = {"completed", "failed", "cancelled", "compensated"}


async def main() -> None:
    async with WorkflowService.connect(os.environ["DATABASE_URL"]) as service:
        workflow = await service.start_workflow(
            "contract_deployment",
            {"contractCode": "0x6080604052", "contractName": "ExampleToken", "constructorArgs": [1_000_000]},
            user_id="example-user",
            wallet_address="0x0000000000000000000000000000000000000001",
        )
        print(f"started workflow {workflow.id}; waiting for a daemon to claim it")
        shown = ""
        while True:
            summary = await service.get_execution_summary(workflow.id)
            progress = (
                f"{summary.state}: {summary.progress_percentage:g} % ({summary.current_step or 'done'})"
            )
            # Progress only once a daemon runs it, and each change once.
            if summary.state != "pending" and progress != shown:
                print(progress)
                shown = progress
            if summary.state in FINISHED:
                break
            await asyncio.sleep(0.2)
        finished = await service.get_workflow(workflow.id)
        output = finished.output
        print(f"contract address {output['contractAddress']}, verified {output['verification']['verified']}")
        print(f"transaction hash {output['transactionHash']}")


if __name__ == "__main__":
    asyncio.run(main())
