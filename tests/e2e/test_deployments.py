"""Deployments that cannot double: contract_deployment version 2 signs, stores, then
sends, against a simulated node (tests/fakes.py) that counts the transactions it takes,
recovers their senders from the signatures, and can lose an answer after doing the work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from engine import WorkflowRecord, WorkflowState
from tests.e2e.conftest import Daemons, run
from tests.fakes import CHAIN_ID, NODE_KEY, Account, Behaviour, Mempool, fake_chain, serving

DAEMON_KEY = "0x" + "2b" * 32
DEPLOYMENTS = 3


@pytest.fixture
def node() -> Iterator[tuple[str, Behaviour, Mempool]]:
    behaviour, mempool = Behaviour(), Mempool()
    with serving(fake_chain(behaviour, mempool)) as url:
        yield url, behaviour, mempool


def http_settings(chain_url: str, ai_url: str, **signer: str) -> dict[str, Any]:
    # A one-second timeout, so that a lost answer costs the test a second.
    return {"adapters": "http", "chain_rpc_url": chain_url, "ai_base_url": ai_url, "ai_api_key": "sk-test",
            "http_timeout": 1, **signer}  # fmt: skip


def deploy(db_url: str, count: int) -> list[WorkflowRecord]:
    input = {"contractCode": "0x6080604052", "constructorArgs": [7]}
    return run(db_url, [("contract_deployment", input | {"contractName": f"Token{n}"}, "deployer")
                        for n in range(count)], timeout=60)  # fmt: skip


def test_a_deployment_retried_after_a_lost_answer_is_one_transaction(
    daemons: Daemons,
    db_url: str,
    db: psycopg.Connection[Any],
    node: tuple[str, Behaviour, Mempool],
    ai_service: tuple[str, Behaviour],
) -> None:
    url, behaviour, mempool = node
    # The node takes the first deployment's transaction, then its answer never comes.
    behaviour.lost_answers["eth_sendRawTransaction"] = 1
    daemons.start(**http_settings(url, ai_service[0], chain_private_key=DAEMON_KEY))
    deployments = deploy(db_url, DEPLOYMENTS)

    assert [workflow.state for workflow in deployments] == [WorkflowState.COMPLETED] * DEPLOYMENTS
    sends = [request for request in behaviour.requests if request["name"] == "eth_sendRawTransaction"]
    assert len(sends) == DEPLOYMENTS + 1, "the lost answer made one resend"
    # One transaction per deployment on the node, signed by the daemon's key, with the
    # nonces 0, 1, 2 (chain_nonces handed out each once), each the one its workflow reports.
    address = Account.from_key(DAEMON_KEY).address
    assert len(mempool.transactions) == DEPLOYMENTS
    assert {tx["from"] for tx in mempool.transactions.values()} == {address}
    assert sorted(tx["nonce"] for tx in mempool.transactions.values()) == list(range(DEPLOYMENTS))
    assert {workflow.output["transactionHash"] for workflow in deployments} == set(mempool.transactions)
    for workflow in deployments:
        receipt = mempool.receipt(workflow.output["transactionHash"])
        assert receipt is not None
        assert workflow.output["contractAddress"] == receipt["contractAddress"]
        assert workflow.output["verification"]["verified"] is True
    assert db.execute("SELECT chain_id, address, next_nonce FROM chain_nonces").fetchall() == [
        (CHAIN_ID, address.lower(), DEPLOYMENTS)
    ]
    # The resend went out in a second attempt of the send step, with the same bytes.
    retried = db.execute(
        "SELECT count(*) FROM workflow_steps WHERE step_name = 'send_transaction' AND attempt = 2"
    ).fetchone()
    assert retried == (1,)


def test_a_signer_that_holds_the_key_signs_for_the_deployer(
    daemons: Daemons, db_url: str, node: tuple[str, Behaviour, Mempool], ai_service: tuple[str, Behaviour]
) -> None:
    url, behaviour, mempool = node
    node_address = Account.from_key(NODE_KEY).address
    daemons.start(**http_settings(url, ai_service[0], chain_deployer=node_address, chain_signer_url=url))
    (deployment,) = deploy(db_url, 1)

    assert deployment.state is WorkflowState.COMPLETED
    (tx,) = mempool.transactions.values()
    assert tx["from"] == node_address
    assert deployment.output["transactionHash"] == tx["hash"]
    assert [request["name"] for request in behaviour.requests].count("eth_signTransaction") == 1


def test_the_sandbox_deploys_without_keys_and_reports_the_seeds_fields(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    (deployment,) = deploy(db_url, 1)

    assert deployment.state is WorkflowState.COMPLETED
    assert deployment.version == 2
    assert set(deployment.output) == {
        "contractName", "contractAddress", "transactionHash", "blockNumber", "verification",
    }  # fmt: skip
    steps = db.execute(
        "SELECT step_name FROM workflow_steps WHERE workflow_id = %s ORDER BY step_index", (deployment.id,)
    ).fetchall()
    assert [name for (name,) in steps] == [
        "sign_deployment", "send_transaction", "wait_for_receipt", "index_contract", "verify_contract",
    ]  # fmt: skip
