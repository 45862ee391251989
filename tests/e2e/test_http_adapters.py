"""The HTTP adapters against simulated services on loopback: good answers, refusals,
timeouts, and retries that resend the same idempotency key."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import psycopg
import pytest

from engine import PermanentError, WorkflowService, WorkflowState
from engine.builtin.http_clients import JsonRpc, JsonRpcChain, OpenAICompatibleAI, ServiceUnavailableError
from tests.e2e.conftest import Daemons
from tests.fakes import NODE_KEY, Account, Behaviour

DEPLOYER = "0x" + "99" * 20


def ai_client(url: str, timeout: float = 5) -> OpenAICompatibleAI:
    return OpenAICompatibleAI(url, "sk-test", chat_model="chat-1", transcription_model="stt-1", speech_model="tts-1",
                              timeout=timeout)  # fmt: skip


def test_the_chain_client_speaks_json_rpc_with_idempotency_keys(chain_service: tuple[str, Behaviour]) -> None:
    url, behaviour = chain_service

    async def scenario() -> None:
        chain = JsonRpcChain(JsonRpc(url), None, DEPLOYER)
        try:
            await exercise(chain)
        finally:
            await chain.aclose()

    async def exercise(chain: JsonRpcChain) -> None:
        tx = await chain.deploy_contract(
            "0x6080", [7, "0x" + "00" * 31 + "01"], idempotency_key="step:deploy:1"
        )
        assert tx == "0x" + "ab" * 32
        assert await chain.get_receipt(tx, idempotency_key="k") == {
            "status": 1,
            "contractAddress": "0x" + "12" * 20,
            "blockNumber": 16,
        }
        assert await chain.get_code("0x" + "12" * 20, idempotency_key="k") == "0x60806040"
        assert await chain.block_number(idempotency_key="k") == 32
        logs = await chain.get_logs(5, 7, idempotency_key="k")
        assert [log["blockNumber"] for log in logs] == [5, 6, 7]
        with pytest.raises(PermanentError, match="execution reverted"):
            await chain.deploy_contract("0xdead", [], idempotency_key="k")
        with pytest.raises(PermanentError, match="uint256"):
            await chain.deploy_contract("0x60", [-1], idempotency_key="k")

    asyncio.run(scenario())
    assert behaviour.keys("eth_sendTransaction")[0] == "step:deploy:1"
    sent = behaviour.requests[0]
    assert sent["name"] == "eth_sendTransaction"


def test_errors_and_timeouts_are_told_apart(
    chain_service: tuple[str, Behaviour], ai_service: tuple[str, Behaviour]
) -> None:
    chain_url, chain_behaviour = chain_service
    ai_url, ai_behaviour = ai_service

    async def scenario() -> None:
        chain_behaviour.failures["eth_getCode"] = [503, 400]
        chain = JsonRpcChain(JsonRpc(chain_url), None, DEPLOYER)
        ai = ai_client(ai_url, timeout=0.2)
        try:
            with pytest.raises(ServiceUnavailableError, match="503"):
                await chain.get_code("0x1", idempotency_key="k")
            with pytest.raises(PermanentError, match="400"):
                await chain.get_code("0x1", idempotency_key="k")
            ai_behaviour.stall_seconds = 1.0
            with pytest.raises(ServiceUnavailableError, match="no answer in time"):
                await ai.complete("hello", idempotency_key="k")
        finally:
            await chain.aclose()
            await ai.aclose()

    asyncio.run(scenario())


def test_the_ai_client_transcribes_completes_and_speaks(ai_service: tuple[str, Behaviour]) -> None:
    url, behaviour = ai_service

    async def scenario() -> None:
        ai = ai_client(url)
        try:
            audio = base64.b64encode(b"0123456789").decode()
            assert await ai.transcribe(audio, idempotency_key="k1") == "heard 10 bytes with stt-1"
            assert (await ai.complete("say hi", idempotency_key="k2")).startswith("chat-1 says:")
            spoken = base64.b64decode(await ai.speak("hi there", idempotency_key="k3")).decode()
            assert spoken == "voice:alloy:hi there"
        finally:
            await ai.aclose()

    asyncio.run(scenario())
    assert [(r["name"], r["key"], r["authorization"]) for r in behaviour.requests] == [
        ("transcriptions", "k1", "Bearer sk-test"), ("chat", "k2", "Bearer sk-test"), ("speech", "k3", "Bearer sk-test"),
    ]  # fmt: skip


def test_a_daemon_on_http_adapters_retries_with_the_same_idempotency_key(
    daemons: Daemons,
    db_url: str,
    db: psycopg.Connection[Any],
    chain_service: tuple[str, Behaviour],
    ai_service: tuple[str, Behaviour],
) -> None:
    chain_url, _ = chain_service
    ai_url, ai_behaviour = ai_service
    ai_behaviour.failures["chat"] = [503, 429]  # two failed attempts, then an answer
    daemons.start(
        adapters="http",
        chain_rpc_url=chain_url,
        chain_deployer=Account.from_key(NODE_KEY).address,  # the node signs for it
        ai_base_url=ai_url,
        ai_api_key="sk-test",
    )

    async def scenario() -> tuple[Any, Any]:
        async with WorkflowService.connect(db_url) as service:
            job = await service.start_workflow(
                "ai_job_chain", {"audio": base64.b64encode(b"hello").decode()}, "u1"
            )
            deploy = await service.start_workflow(
                "contract_deployment", {"contractCode": "0x6080", "contractName": "T"}, "u1"
            )
            return await service.wait_for(job.id, timeout=30), await service.wait_for(deploy.id, timeout=30)

    job, deploy = asyncio.run(scenario())
    assert job.state is WorkflowState.COMPLETED
    assert job.output["reply"].startswith("gpt-4o-mini says:")
    keys = ai_behaviour.keys("chat")
    assert len(keys) == 3
    assert len(set(keys)) == 1, "every attempt sent the step's idempotency key"
    step_key = db.execute("SELECT idempotency_key FROM workflow_steps WHERE step_name = 'llm'").fetchone()
    assert step_key == (keys[0],)
    assert deploy.state is WorkflowState.COMPLETED
    assert deploy.output["contractAddress"].startswith("0x")
    assert len(deploy.output["contractAddress"]) == 42
