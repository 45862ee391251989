"""Built-in chain workflows: contract_deployment and indexing_verification."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator

from engine import PermanentError, Snooze, Step, Workflow, WorkflowContext
from engine.builtin.adapters import ChainClient
from engine.builtin.evm import Deployer, encode_constructor_args
from engine.definitions import ExecuteFn

RECEIPT_POLL_SECONDS = 1.0
RECEIPT_WAIT_SECONDS = 120.0
# Version 2 waits by snoozing (engine.Snooze: no worker slot is held meanwhile): for a
# receipt, checked this often; then for CONFIRMATIONS blocks on the deployment's own
# (it included), before verifying the contract's code.
CHAIN_CHECK_SECONDS = 2.0
CONFIRMATIONS = 2
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


async def receipt_of(chain: ChainClient, tx_hash: str, key: str) -> dict[str, Any]:
    """Poll for a transaction's receipt, for at most RECEIPT_WAIT_SECONDS (the step then
    times out and is retried); a reverted one fails the step for good."""
    async with asyncio.timeout(RECEIPT_WAIT_SECONDS):
        while True:  # the chain offers no push: poll it
            receipt = await chain.get_receipt(tx_hash, idempotency_key=key)
            if receipt is not None:
                break
            await asyncio.sleep(RECEIPT_POLL_SECONDS)
    if receipt.get("status") != 1:
        raise PermanentError(f"transaction {tx_hash} reverted")
    return receipt


ALLOCATE_NONCE = """
INSERT INTO chain_nonces (chain_id, address, next_nonce)
VALUES (%(chain_id)s, lower(%(address)s), %(pending)s + 1)
ON CONFLICT (chain_id, address) DO UPDATE
SET next_nonce = greatest(chain_nonces.next_nonce, %(pending)s) + 1, updated_at = now()
RETURNING next_nonce - 1
"""


async def allocate_nonce(ctx: WorkflowContext, deployer: Deployer) -> int:
    """The next nonce of the deploying account, in the signing step's own transaction
    (sql/migrations/0009_chain_nonces.sql): held by no other deployment, and spent only
    if the signed transaction is stored with it."""
    assert ctx.connection is not None  # transactional
    values = {"chain_id": deployer.chain_id, "address": deployer.address, "pending": deployer.pending_nonce}
    cursor = await ctx.connection.execute(ALLOCATE_NONCE, values)
    row = await cursor.fetchone()
    assert row is not None  # an upsert returns its row
    return int(row[0])


def deployment_output(input: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished deployment returns: the seed's `contractAddress` and
    `transactionHash`, where it landed, and its verification."""
    deployed = outputs["wait_for_receipt"]
    return {
        "contractName": input["contractName"],
        "contractAddress": deployed["contractAddress"],
        "transactionHash": deployed["transactionHash"],
        "blockNumber": deployed["blockNumber"],
        "verification": outputs["verify_contract"]["verification"],
    }


def contract_deployments(chain: ChainClient) -> list[Workflow]:
    """Version 2, which signs, sends and waits in steps of their own so that a deployment
    never doubles; and version 1, one step that sends for the node to sign, kept for the
    deployments it started until none is left (`workflowd versions`)."""
    index_contract, verify_contract = contract_bookkeeping(chain, "wait_for_receipt")

    async def sign_deployment(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        if input["contractCode"] in ("", "0x"):
            raise PermanentError("the contract bytecode is empty")
        data = input["contractCode"] + encode_constructor_args(input.get("constructorArgs", []))
        deployer = await chain.deployer(idempotency_key=ctx.idempotency_key)
        nonce = await allocate_nonce(ctx, deployer)
        signed = await chain.sign_deployment(data, nonce, deployer, idempotency_key=ctx.idempotency_key)
        return {"chainId": deployer.chain_id, "from": deployer.address, "nonce": nonce, **signed}

    async def send_transaction(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        # The same signed bytes on every attempt: a resend after a lost answer is the
        # same transaction, which the node already holds, never a second deployment.
        signed = ctx.outputs["sign_deployment"]
        sent = await chain.send_raw_transaction(signed["rawTransaction"], idempotency_key=ctx.idempotency_key)
        if sent.lower() != signed["transactionHash"].lower():
            raise PermanentError(
                f"the node took the transaction as {sent}, signed as {signed['transactionHash']}"
            )
        return {"transactionHash": signed["transactionHash"]}

    async def wait_for_receipt(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        # A transaction never mined keeps the workflow waiting (a snooze a check, in its
        # timeline) until an operator cancels it: it may still be mined.
        tx_hash = ctx.outputs["send_transaction"]["transactionHash"]
        receipt = await chain.get_receipt(tx_hash, idempotency_key=ctx.idempotency_key)
        if receipt is None:
            raise Snooze(CHAIN_CHECK_SECONDS, f"transaction {tx_hash} is not mined yet")
        if receipt.get("status") != 1:
            raise PermanentError(f"transaction {tx_hash} reverted")
        return {"transactionHash": tx_hash, "contractAddress": receipt["contractAddress"],
                "blockNumber": receipt["blockNumber"]}  # fmt: skip

    v2 = Workflow(
        type="contract_deployment",
        version=2,
        name="Contract deployment",
        description="Sign a deployment, send it, wait for its receipt, index the contract, verify its code.",
        input_model=ContractDeploymentInput,
        output=deployment_output,
        steps=[
            Step("sign_deployment", sign_deployment, transactional=True, timeout=60),
            Step("send_transaction", send_transaction, timeout=60),
            Step("wait_for_receipt", wait_for_receipt, timeout=60),
            Step("index_contract", index_contract, transactional=True),
            Step("verify_contract", verify_contract, timeout=60),
        ],
    )
    return [v2, contract_deployment_v1(chain)]


def contract_deployment_v1(chain: ChainClient) -> Workflow:
    """deploy_contract -> index_contract -> verify_contract, as released first."""
    index_contract, verify_contract = contract_bookkeeping(chain, "deploy_contract")

    async def deploy_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        key = ctx.idempotency_key
        tx_hash = await chain.deploy_contract(
            input["contractCode"], input.get("constructorArgs", []), idempotency_key=key
        )
        receipt = await receipt_of(chain, tx_hash, key)
        return {
            "transactionHash": tx_hash,
            "contractAddress": receipt["contractAddress"],
            "blockNumber": receipt["blockNumber"],
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


def contract_bookkeeping(chain: ChainClient, deployed_by: str) -> tuple[ExecuteFn, ExecuteFn]:
    """index_contract and verify_contract, reading the deployment from the output of
    step `deployed_by` ({transactionHash, contractAddress, blockNumber})."""

    async def index_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        deployed = ctx.outputs[deployed_by]
        assert ctx.connection is not None  # transactional
        await ctx.connection.execute(
            "INSERT INTO indexed_contracts (address, name, transaction_hash, block_number, workflow_id) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (address) DO NOTHING",
            (deployed["contractAddress"], input["contractName"], deployed["transactionHash"],
             deployed["blockNumber"], ctx.workflow_id),
        )  # fmt: skip
        return {"indexed": True, "contractAddress": deployed["contractAddress"]}

    async def verify_contract(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        deployed = ctx.outputs[deployed_by]
        latest = await chain.block_number(idempotency_key=ctx.idempotency_key)
        block = deployed["blockNumber"]
        if latest - block + 1 < CONFIRMATIONS:
            reason = f"block {block} has fewer than {CONFIRMATIONS} confirmations (the chain is at {latest})"
            raise Snooze(CHAIN_CHECK_SECONDS, reason)
        code = await chain.get_code(deployed["contractAddress"], idempotency_key=ctx.idempotency_key)
        if code in ("", "0x"):
            raise PermanentError(f"no code at {deployed['contractAddress']}: the deployment did not stick")
        return {
            "contractName": input["contractName"],
            "contractAddress": deployed["contractAddress"],
            "transactionHash": deployed["transactionHash"],
            "verification": {"verified": True, "codeSize": (len(code) - 2) // 2},
        }

    return index_contract, verify_contract


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
