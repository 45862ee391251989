"""The sandbox adapters: deterministic answers, and injected failures that retries outlast."""

from __future__ import annotations

import asyncio

import pytest

from engine import PermanentError
from engine.builtin.sandbox import MAX_INJECTED_FAILURES_PER_KEY, SandboxUnavailableError, sandbox_adapters


def test_answers_derive_from_the_inputs_and_the_key_alone() -> None:
    async def deploy() -> tuple[str, object]:
        chain = sandbox_adapters().chain
        tx = await chain.deploy_contract("0x60", [1], idempotency_key="step:deploy:abc")
        return tx, await chain.get_receipt(tx, idempotency_key="k")

    assert asyncio.run(deploy()) == asyncio.run(deploy())  # another process, the same answers


def test_injected_failures_stop_before_the_retries_run_out() -> None:
    async def calls() -> list[bool]:
        ai = sandbox_adapters(failure_rate=1.0).ai  # every call would fail
        outcomes = []
        for _ in range(MAX_INJECTED_FAILURES_PER_KEY + 2):
            try:
                await ai.complete("hi", idempotency_key="step:llm:1")
                outcomes.append(True)
            except SandboxUnavailableError:
                outcomes.append(False)
        return outcomes

    assert asyncio.run(calls()) == [False] * MAX_INJECTED_FAILURES_PER_KEY + [True, True]


def test_the_demo_failures_are_permanent() -> None:
    adapters = sandbox_adapters()
    with pytest.raises(PermanentError, match="bytecode is empty"):
        asyncio.run(adapters.chain.deploy_contract("0x", [], idempotency_key="k"))
    with pytest.raises(PermanentError, match="cannot be notified"):
        asyncio.run(adapters.notifier.notify("unreachable-1", "hi", idempotency_key="k"))
