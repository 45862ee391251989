"""Built-in chain workflows: contract_deployment and indexing_verification."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field, model_validator

from engine import PermanentError, Step, Workflow, WorkflowContext
from engine.builtin.adapters import ChainClient

RECEIPT_POLL_SECONDS = 1.0
RECEIPT_WAIT_SECONDS = 120.0
MAX_BLOCK_RANGE = 1_000


class ContractDeploymentInput(BaseModel):
    """The seed's deployment request."""

    contractCode: str = Field(pattern=r"^0x[0-9a-fA-F]*$", description="the contract's bytecode, hex")
    contractName: str = Field(min_length=1, max_length=200)
    constructorArgs: list[Any] = Field(default_factory=list)


class IndexingInput(BaseModel):
    """A block range to index and verify."""

    fromBlock: int = Field(ge=0)
    toBlock: int = Field(ge=0)

    @model_validator(mode="after")
    def _a_bounded_range(self) -> IndexingInput:
        if self.toBlock < self.fromBlock:
            raise ValueError("toBlock must not be below fromBlock")
        if self.toBlock - self.fromBlock >= MAX_BLOCK_RANGE:
            raise ValueError(f"a range holds at most {MAX_BLOCK_RANGE} blocks")
        return self


async def wait_for_receipt(chain: ChainClient, tx_hash: str, key: str) -> dict[str, Any]:
    """Poll for a transaction's receipt; a reverted or missing one fails the step."""
    async with asyncio.timeout(RECEIPT_WAIT_SECONDS):
        while True:  # the chain offers no push: poll it
            receipt = await chain.get_receipt(tx_hash, idempotency_key=key)
            if receipt is not None:
                break
            await asyncio.sleep(RECEIPT_POLL_SECONDS)
    if receipt.get("status") != 1:
        raise PermanentError(f"transaction {tx_hash} reverted")
    return receipt


def contract_deployment(chain: ChainClient) -> Workflow:
    """deploy_contract -> index_contract -> verify_contract."""

    async def deploy_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        key = ctx.idempotency_key
        tx_hash = await chain.deploy_contract(
            input["contractCode"], input.get("constructorArgs", []), idempotency_key=key
        )
        receipt = await wait_for_receipt(chain, tx_hash, key)
        return {
            "transactionHash": tx_hash,
            "contractAddress": receipt["contractAddress"],
            "blockNumber": receipt["blockNumber"],
        }

    async def index_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        deployed = ctx.outputs["deploy_contract"]
        assert ctx.connection is not None  # transactional
        await ctx.connection.execute(
            "INSERT INTO indexed_contracts (address, name, transaction_hash, block_number, workflow_id) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (address) DO NOTHING",
            (deployed["contractAddress"], input["contractName"], deployed["transactionHash"],
             deployed["blockNumber"], ctx.workflow_id),
        )  # fmt: skip
        return {"indexed": True, "contractAddress": deployed["contractAddress"]}

    async def verify_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        deployed = ctx.outputs["deploy_contract"]
        code = await chain.get_code(deployed["contractAddress"], idempotency_key=ctx.idempotency_key)
        if code in ("", "0x"):
            raise PermanentError(f"no code at {deployed['contractAddress']}: the deployment did not stick")
        return {
            "contractName": input["contractName"],
            "contractAddress": deployed["contractAddress"],
            "transactionHash": deployed["transactionHash"],
            "verification": {"verified": True, "codeSize": (len(code) - 2) // 2},
        }

    return Workflow(
        type="contract_deployment",
        name="Contract deployment",
        description="Deploy a contract, index it, verify its code on chain.",
        input_model=ContractDeploymentInput,
        steps=[
            Step("deploy_contract", deploy_contract, timeout=RECEIPT_WAIT_SECONDS + 30),
            Step("index_contract", index_contract, transactional=True),
            Step("verify_contract", verify_contract, timeout=60),
        ],
    )


def indexing_verification(chain: ChainClient) -> Workflow:
    """fetch_blocks -> index_events -> verify_index."""

    async def fetch_blocks(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        logs = await chain.get_logs(input["fromBlock"], input["toBlock"], idempotency_key=ctx.idempotency_key)
        return {"logs": logs, "count": len(logs)}

    async def index_events(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        logs = ctx.outputs["fetch_blocks"]["logs"]
        assert ctx.connection is not None  # transactional
        async with ctx.connection.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO indexed_events (block_number, log_index, transaction_hash, address, data) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [
                    (log["blockNumber"], log["logIndex"], log["transactionHash"], log["address"], log["data"])
                    for log in logs
                ],
            )
        return {"indexed": len(logs)}

    async def verify_index(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        on_chain = await chain.get_logs(
            input["fromBlock"], input["toBlock"], idempotency_key=ctx.idempotency_key
        )
        assert ctx.connection is not None  # transactional: reads the index in the same transaction
        cursor = await ctx.connection.execute(
            "SELECT count(*) FROM indexed_events WHERE block_number BETWEEN %s AND %s",
            (input["fromBlock"], input["toBlock"]),
        )
        row = await cursor.fetchone()
        indexed = int(row[0]) if row else 0
        if indexed != len(on_chain):
            blocks = f"{input['fromBlock']}-{input['toBlock']}"
            raise PermanentError(
                f"the index holds {indexed} events of blocks {blocks}, the chain {len(on_chain)}"
            )
        return {
            "fromBlock": input["fromBlock"],
            "toBlock": input["toBlock"],
            "events": indexed,
            "verified": True,
        }

    return Workflow(
        type="indexing_verification",
        name="Indexing and verification",
        description="Fetch a block range's events, index them, verify the index against the chain.",
        input_model=IndexingInput,
        steps=[
            Step("fetch_blocks", fetch_blocks, timeout=60),
            Step("index_events", index_events, transactional=True),
            Step("verify_index", verify_index, transactional=True, timeout=60),
        ],
    )
