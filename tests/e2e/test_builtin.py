"""The five built-in workflow types end to end on the sandbox adapters, with their
failures and compensations, and their ledgers applied exactly once across kill -9."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import time
from decimal import Decimal
from typing import Any

import psycopg

from engine import WorkflowService, WorkflowState
from engine.records import WorkflowRecord
from tests.e2e.conftest import Daemons, assert_timeline_is_legal, run, wait_until


def test_contract_deployment_deploys_indexes_and_verifies(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    (done, empty) = run(db_url, [
        ("contract_deployment", {"contractCode": "0x6080604052", "contractName": "Token", "constructorArgs": [1000]}, "u1"),
        ("contract_deployment", {"contractCode": "0x", "contractName": "Empty"}, "u1"),
    ])  # fmt: skip
    assert done.state is WorkflowState.COMPLETED
    output = done.output
    assert output["contractName"] == "Token"
    assert output["contractAddress"].startswith("0x")
    assert len(output["contractAddress"]) == 42
    assert output["transactionHash"].startswith("0x")
    assert output["verification"]["verified"] is True
    indexed = db.execute(
        "SELECT name, transaction_hash FROM indexed_contracts WHERE address = %s",
        (output["contractAddress"],),
    )
    assert indexed.fetchall() == [("Token", output["transactionHash"])]
    assert empty.state is WorkflowState.FAILED
    assert empty.error == {
        "type": "PermanentError",
        "message": "the contract bytecode is empty",
        "step": "sign_deployment",
        "attempt": 1,
    }


def test_trade_execution_books_the_portfolio_and_a_failed_trade_is_unwound(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    (settled, slipped) = run(db_url, [
        ("trade_execution", {"tokenA": "ETH", "tokenB": "USDC", "amount": 2, "slippage": 0.005}, "trader"),
        ("trade_execution", {"tokenA": "ETH", "tokenB": "DAI", "amount": 1, "slippage": 0.0001}, "trader"),
    ])  # fmt: skip
    assert settled.state is WorkflowState.COMPLETED
    assert settled.output["amountIn"] == "2"
    booked = {
        token: Decimal(delta)
        for token, delta in db.execute(
            "SELECT token, delta::text FROM portfolio_movements WHERE workflow_id = %s", (settled.id,)
        ).fetchall()
    }
    assert booked == {"ETH": Decimal(-2), "USDC": Decimal(settled.output["amountOut"])}
    assert slipped.state is WorkflowState.COMPENSATED
    assert slipped.error is not None
    assert "slippage" in slipped.error["message"]
    positions = dict(
        db.execute("SELECT token, amount FROM portfolio_positions WHERE user_id = 'trader'").fetchall()
    )
    assert positions == booked  # the slipped trade never reached the books
    unwound = db.execute(
        "SELECT to_state FROM workflow_events WHERE workflow_id = %s AND step_name = 'execute_trade' ORDER BY id",
        (slipped.id,),
    ).fetchall()
    assert unwound[-2:] == [("compensating",), ("compensated",)]
    assert_timeline_is_legal(db)


def test_a_trade_whose_booking_is_undone_reverses_the_portfolio(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    (trade,) = run(
        db_url, [("trade_execution", {"tokenA": "BTC", "tokenB": "USDC", "amount": 1}, "reverser")]
    )
    assert trade.state is WorkflowState.COMPLETED

    # A completed workflow is not compensated by command; stage an operator's case instead:
    # the workflow failed after its booking (a later step, say), and is then compensated.
    db.execute("UPDATE workflows SET state = 'failed' WHERE id = %s", (trade.id,))

    async def compensate() -> WorkflowRecord:
        async with WorkflowService.connect(db_url) as service:
            await service.compensate_workflow(trade.id)
            return await service.wait_for(trade.id, timeout=20)

    assert asyncio.run(compensate()).state is WorkflowState.COMPENSATED
    positions = dict(
        db.execute(
            "SELECT token, amount::float8 FROM portfolio_positions WHERE user_id = 'reverser'"
        ).fetchall()
    )
    assert positions == {"BTC": 0.0, "USDC": 0.0}
    kinds = db.execute(
        "SELECT kind, count(*) FROM portfolio_movements WHERE workflow_id = %s GROUP BY kind ORDER BY kind",
        (trade.id,),
    )
    assert kinds.fetchall() == [("reversal", 2), ("trade", 2)]


def test_ai_job_chain_transcribes_answers_and_speaks(daemons: Daemons, db_url: str) -> None:
    daemons.start()
    audio = base64.b64encode(b"what is the weather like").decode()
    (job, broken) = run(db_url, [
        ("ai_job_chain", {"audio": audio, "instruction": "Be brief."}, "u1"),
        ("ai_job_chain", {"audio": "not base64!"}, "u1"),
    ])  # fmt: skip
    assert job.state is WorkflowState.COMPLETED
    assert job.output["transcript"].startswith("sandbox transcript of 24 bytes")
    assert job.output["reply"].startswith("sandbox completion")
    assert base64.b64decode(job.output["audio"]).decode() == f"sandbox speech: {job.output['reply']}"
    assert broken.state is WorkflowState.FAILED
    assert broken.error is not None
    assert broken.error["message"] == "the audio is not valid base64"


def test_indexing_verification_indexes_a_block_range_and_verifies_it(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    (indexed, too_wide) = run(db_url, [
        ("indexing_verification", {"fromBlock": 100, "toBlock": 140}, "indexer"),
        ("indexing_verification", {"fromBlock": 0, "toBlock": 5000}, "indexer"),
    ])  # fmt: skip
    assert indexed.state is WorkflowState.COMPLETED
    events = db.execute(
        "SELECT count(*) FROM indexed_events WHERE block_number BETWEEN 100 AND 140"
    ).fetchone()
    assert events is not None
    assert indexed.output == {"fromBlock": 100, "toBlock": 140, "events": events[0], "verified": True}
    assert too_wide.state is WorkflowState.FAILED
    assert too_wide.error is not None
    assert too_wide.error["type"] == "InputValidationError"


def test_reward_grant_grants_once_and_revokes_when_the_user_cannot_be_told(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    daemons.start()
    (granted, unreachable, too_big) = run(db_url, [
        ("reward_grant", {"amount": 50, "reason": "referral"}, "alice"),
        ("reward_grant", {"amount": 20, "reason": "referral"}, "unreachable-bob"),
        ("reward_grant", {"amount": 50_000, "reason": "typo"}, "carol"),
    ])  # fmt: skip
    assert granted.state is WorkflowState.COMPLETED
    assert granted.output == {
        "grantId": str(granted.id), "amount": "50", "userId": "alice", "notified": "alice",
        "message": "You received 50 for referral.",
    }  # fmt: skip
    assert unreachable.state is WorkflowState.COMPENSATED
    assert too_big.state is WorkflowState.COMPENSATED  # failed at validate: nothing to undo
    ledger = db.execute(
        "SELECT user_id, amount::float8, status FROM reward_grants ORDER BY user_id"
    ).fetchall()
    assert ledger == [("alice", 50.0, "granted"), ("unreachable-bob", 20.0, "revoked")]
    assert_timeline_is_legal(db)


def test_the_ledgers_are_applied_exactly_once_across_kill_9(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    async def start_all() -> None:
        async with WorkflowService.connect(db_url) as service:
            for n in range(15):
                await service.start_workflow("reward_grant", {"amount": 10, "reason": f"r{n}"}, f"user-{n}")
                await service.start_workflow(
                    "trade_execution", {"tokenA": "ETH", "tokenB": "USDC", "amount": 1, "n": n}, "kill-trader"
                )

    asyncio.run(start_all())
    rng = random.Random(5)
    # Three kills, each while steps are in flight (150 ms per outside call): an
    # interrupted attempt spends a retry, and the built-in types allow three.
    for _ in range(3):
        victim = daemons.start(lease_seconds=0.5, poll_interval=0.05, sandbox_latency_ms=150)
        time.sleep(rng.uniform(0.2, 0.8))
        victim.signal(signal.SIGKILL)
        victim.process.wait(timeout=5)
    daemons.start(lease_seconds=0.5, poll_interval=0.05)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM workflows WHERE state = 'completed'").fetchone() == (30,),
        60, "every workflow to complete",
    )  # fmt: skip
    assert db.execute(
        "SELECT count(*), count(DISTINCT workflow_id), sum(amount) FROM reward_grants"
    ).fetchone() == (15, 15, 150)
    movements = db.execute(
        "SELECT count(*), count(DISTINCT workflow_id) FROM portfolio_movements WHERE kind = 'trade'"
    )
    assert movements.fetchone() == (30, 15)
    assert db.execute(
        "SELECT amount::float8 FROM portfolio_positions WHERE user_id = 'kill-trader' AND token = 'ETH'"
    ).fetchone() == (-15.0,)
    # The kills really cut steps off (an interrupted step is started again: running ->
    # running), and no step ever tried to apply a booking twice: the primary keys of the
    # ledgers would have refused it with a unique violation, failing an attempt.
    restarts = db.execute(
        "SELECT count(*) FROM workflow_events WHERE from_state = 'running' AND to_state = 'running'"
    )
    assert restarts.fetchone()[0] > 0  # type: ignore[index]
    assert db.execute(
        "SELECT count(*) FROM workflow_events WHERE error::text LIKE '%%UniqueViolation%%'"
    ).fetchone() == (0,)
