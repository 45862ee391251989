"""The outside services of the built-in workflow types, as small interfaces.

Every call takes the calling step's idempotency key, so that a service can deduplicate a
call that a crash made the engine repeat. Two families implement them: deterministic
sandboxes (engine.builtin.sandbox) for development, demos and tests, and clients of real
services over HTTP (engine.builtin.http_clients).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from engine.builtin.evm import Deployer


class ChainClient(Protocol):
    """An EVM chain: deploy and inspect contracts, read event logs."""

    async def deployer(self, *, idempotency_key: str) -> Deployer:
        """The account that signs deployments: its chain, address and pending nonce."""

    async def sign_deployment(
        self, data: str, nonce: int, deployer: Deployer, *, idempotency_key: str
    ) -> dict[str, str]:
        """Sign, without sending, the transaction that deploys `data` (bytecode and
        constructor arguments) with `nonce`: {rawTransaction, transactionHash}."""

    async def send_raw_transaction(self, raw_tx: str, *, idempotency_key: str) -> str:
        """Send a signed transaction; returns its hash. Sending the same bytes again is
        harmless: a node that holds them, or mined them, answers with the same hash."""

    async def deploy_contract(
        self, bytecode: str, constructor_args: list[Any], *, idempotency_key: str
    ) -> str:
        """Send the deployment transaction for the node to sign (version 1 of
        contract_deployment, kept for its workflows in flight); returns its hash."""

    async def get_receipt(self, tx_hash: str, *, idempotency_key: str) -> dict[str, Any] | None:
        """The receipt ({status, contractAddress, blockNumber}), or None while pending."""

    async def get_code(self, address: str, *, idempotency_key: str) -> str:
        """The code deployed at an address ('0x' when none)."""

    async def block_number(self, *, idempotency_key: str) -> int:
        """The latest block number."""

    async def get_logs(self, from_block: int, to_block: int, *, idempotency_key: str) -> list[dict[str, Any]]:
        """The event logs of a block range."""


class Exchange(Protocol):
    """A trading venue."""

    async def execute_trade(
        self, token_a: str, token_b: str, amount: Decimal, slippage: Decimal, *, idempotency_key: str
    ) -> dict[str, Any]:
        """Swap `amount` of token_a for token_b, accepting a price up to `slippage` (a
        fraction) worse than quoted; returns {trade_id, tradeHash, amount_in, amount_out,
        price}, amounts as decimal strings."""

    async def confirm_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        """Whether the trade settled: {trade_id, status} with status `settled`, or
        `pending` while the exchange has not settled it yet (the step checks again
        later); a trade that will not settle raises PermanentError."""

    async def unwind_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        """Reverse a trade (the saga's undo); returns {trade_id, status}."""


class AIClient(Protocol):
    """Speech-to-text, a language model and text-to-speech (OpenAI-compatible)."""

    async def transcribe(self, audio_base64: str, *, idempotency_key: str) -> str:
        """The transcript of an audio clip."""

    async def complete(self, prompt: str, *, idempotency_key: str) -> str:
        """A chat completion of a prompt."""

    async def speak(self, text: str, *, idempotency_key: str) -> str:
        """Speech for a text, base64-encoded."""


class Notifier(Protocol):
    """Tells a user about something (a reward granted)."""

    async def notify(self, user_id: str, message: str, *, idempotency_key: str) -> None:
        """Deliver one message."""


@dataclass(frozen=True)
class Adapters:
    """The services the built-in workflow types use."""

    chain: ChainClient
    exchange: Exchange
    ai: AIClient
    notifier: Notifier
    # Shown in logs and by `workflowd dev`: "sandbox" or "http".
    kind: str
