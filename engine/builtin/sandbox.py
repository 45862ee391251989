"""Sandbox adapters: deterministic stand-ins for the chain, the exchange, the AI services
and the notifier, for development, demos and tests. Not real services.

Answers are derived from the inputs and the idempotency key alone, so they agree across
daemon processes and restarts (a receipt asked for by another daemon than the one that
deployed still exists). Latency and a rate of injected transient failures can be set,
to show retries and compensation; both are off by default.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from engine.builtin.adapters import Adapters
from engine.builtin.chain import CONFIRMATIONS
from engine.builtin.evm import Deployer
from engine.builtin.money import SMALLEST_UNIT, amount_text
from engine.errors import PermanentError

SANDBOX_BLOCK_HEIGHT = 1_000_000
SANDBOX_CHAIN_ID = 31337  # the chain id local development chains use
MAX_INJECTED_FAILURES_PER_KEY = 2
# The sandbox refuses slippage tolerances below this fraction (0.1 %), at confirmation:
# a realistic way to make a trade fail after it executed, so its compensation (an
# unwind) runs.
SANDBOX_MIN_SLIPPAGE = Decimal("0.001")
# Prices to 8 decimals; fills to a token's smallest unit.
PRICE_QUANTUM = Decimal("1e-8")


class SandboxUnavailableError(Exception):
    """A transient failure injected by a sandbox: retrying may succeed."""


def digest(*parts: object) -> str:
    """A stable hex digest of the parts."""
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


@dataclass
class SandboxFaults:
    """Latency and injected transient failures shared by the sandboxes of one process.

    Whether the n-th call of an operation with a given idempotency key fails is a pure
    function of (operation, key, n) and of the failures already injected for that key,
    so a run is reproducible.
    """

    latency_seconds: float = 0.0
    failure_rate: float = 0.0
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)

    async def enter(self, operation: str, idempotency_key: str) -> None:
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
        self.calls[operation, idempotency_key] += 1
        draw = (
            int(digest(operation, idempotency_key, self.calls[operation, idempotency_key])[:8], 16)
            / 0xFFFFFFFF
        )
        # At most MAX_INJECTED_FAILURES_PER_KEY for one step (one key): with the default
        # three retries, injected failures show retries but never fail a workflow.
        if draw < self.failure_rate and self.injected[idempotency_key] < MAX_INJECTED_FAILURES_PER_KEY:
            self.injected[idempotency_key] += 1
            raise SandboxUnavailableError(f"sandbox {operation}: injected transient failure")


@dataclass
class SandboxChain:
    """A sandbox EVM chain: every deployment succeeds (unless its bytecode is empty).
    No keys: a "signed" transaction is a digest of what it would carry."""

    faults: SandboxFaults

    async def deployer(self, *, idempotency_key: str) -> Deployer:
        await self.faults.enter("deployer", idempotency_key)
        # Stateless: the node counts no pending transactions; chain_nonces counts them.
        return Deployer(SANDBOX_CHAIN_ID, "0x" + digest("sandbox-deployer")[:40], 0)

    async def sign_deployment(
        self, data: str, nonce: int, deployer: Deployer, *, idempotency_key: str
    ) -> dict[str, str]:
        await self.faults.enter("sign_deployment", idempotency_key)
        raw = "0x" + digest("raw", deployer.chain_id, deployer.address, nonce, data)
        return {"rawTransaction": raw, "transactionHash": "0x" + digest("tx", raw)}

    async def send_raw_transaction(self, raw_tx: str, *, idempotency_key: str) -> str:
        await self.faults.enter("send_raw_transaction", idempotency_key)
        return "0x" + digest("tx", raw_tx)

    async def deploy_contract(
        self, bytecode: str, constructor_args: list[Any], *, idempotency_key: str
    ) -> str:
        await self.faults.enter("deploy_contract", idempotency_key)
        if bytecode in ("", "0x"):
            raise PermanentError("the contract bytecode is empty")
        return "0x" + digest("tx", idempotency_key, bytecode, constructor_args)

    async def get_receipt(self, tx_hash: str, *, idempotency_key: str) -> dict[str, Any] | None:
        await self.faults.enter("get_receipt", idempotency_key)
        return {
            "status": 1,
            "contractAddress": "0x" + digest("address", tx_hash)[:40],
            # Mined deep enough to be verified at once (the sandbox chain does not grow).
            "blockNumber": SANDBOX_BLOCK_HEIGHT - max(int(digest("block", tx_hash)[:4], 16), CONFIRMATIONS),
        }

    async def get_code(self, address: str, *, idempotency_key: str) -> str:
        await self.faults.enter("get_code", idempotency_key)
        return "0x6080604052" + digest("code", address)[:32]

    async def block_number(self, *, idempotency_key: str) -> int:
        await self.faults.enter("block_number", idempotency_key)
        return SANDBOX_BLOCK_HEIGHT

    async def get_logs(self, from_block: int, to_block: int, *, idempotency_key: str) -> list[dict[str, Any]]:
        await self.faults.enter("get_logs", idempotency_key)
        logs = []
        for block in range(from_block, to_block + 1):
            for index in range(int(digest("logs", block)[:2], 16) % 3):  # 0 to 2 events a block
                logs.append(
                    {
                        "blockNumber": block,
                        "logIndex": index,
                        "transactionHash": "0x" + digest("log-tx", block, index),
                        "address": "0x" + digest("log-address", block, index)[:40],
                        "data": "0x" + digest("log-data", block, index)[:16],
                    }
                )
        return logs


@dataclass
class SandboxExchange:
    """A sandbox exchange with deterministic prices; it deduplicates trades by key."""

    faults: SandboxFaults

    async def execute_trade(
        self, token_a: str, token_b: str, amount: Decimal, slippage: Decimal, *, idempotency_key: str
    ) -> dict[str, Any]:
        await self.faults.enter("execute_trade", idempotency_key)
        spread = Decimal(int(digest("price", token_a, token_b)[:6], 16)) / 0xFFFFFF * 2
        price = (Decimal("0.5") + spread).quantize(PRICE_QUANTUM)
        # Stateless: the trade id carries what confirmation needs to know.
        tight = "tight-" if slippage < SANDBOX_MIN_SLIPPAGE else ""
        return {
            "trade_id": f"trade-{tight}" + digest("trade", idempotency_key)[:16],
            "tradeHash": "0x" + digest("trade-hash", idempotency_key),
            "amount_in": amount_text(amount),
            "amount_out": amount_text((amount * price).quantize(SMALLEST_UNIT)),
            "price": amount_text(price),
            "slippage": amount_text(slippage),
        }

    async def confirm_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        await self.faults.enter("confirm_trade", idempotency_key)
        if trade_id.startswith("trade-tight-"):
            raise PermanentError(f"the price moved beyond the allowed slippage while settling {trade_id}")
        return {"trade_id": trade_id, "status": "settled"}

    async def unwind_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        await self.faults.enter("unwind_trade", idempotency_key)
        return {"trade_id": trade_id, "status": "unwound"}


@dataclass
class SandboxAI:
    """Sandbox speech-to-text, language model and text-to-speech."""

    faults: SandboxFaults

    async def transcribe(self, audio_base64: str, *, idempotency_key: str) -> str:
        await self.faults.enter("transcribe", idempotency_key)
        try:
            audio = base64.b64decode(audio_base64, validate=True)
        except ValueError:
            raise PermanentError("the audio is not valid base64") from None
        return f"sandbox transcript of {len(audio)} bytes ({digest('audio', audio_base64)[:8]})"

    async def complete(self, prompt: str, *, idempotency_key: str) -> str:
        await self.faults.enter("complete", idempotency_key)
        return f"sandbox completion ({digest('completion', prompt)[:8]}) for: {prompt[:80]}"

    async def speak(self, text: str, *, idempotency_key: str) -> str:
        await self.faults.enter("speak", idempotency_key)
        return base64.b64encode(f"sandbox speech: {text}".encode()).decode()


@dataclass
class SandboxNotifier:
    """A sandbox notifier: users whose id starts with 'unreachable' cannot be told."""

    faults: SandboxFaults

    async def notify(self, user_id: str, message: str, *, idempotency_key: str) -> None:
        await self.faults.enter("notify", idempotency_key)
        if user_id.startswith("unreachable"):
            raise PermanentError(f"user {user_id} cannot be notified")


def sandbox_adapters(latency_seconds: float = 0.0, failure_rate: float = 0.0) -> Adapters:
    """The sandbox adapters, sharing one fault injector."""
    faults = SandboxFaults(latency_seconds, failure_rate)
    return Adapters(
        chain=SandboxChain(faults),
        exchange=SandboxExchange(faults),
        ai=SandboxAI(faults),
        notifier=SandboxNotifier(faults),
        kind="sandbox",
    )
