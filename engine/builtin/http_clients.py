"""Clients of real services over HTTP: an EVM JSON-RPC chain, an OpenAI-compatible AI
service, an exchange and a notifier (REST, the shapes documented in the README). Every
request carries the step's idempotency key as an `Idempotency-Key` header and has a
timeout. No answer in time, a broken connection, 5xx and 429 raise
`ServiceUnavailableError` (the step is retried with the same key); any other refusal
raises PermanentError.
"""

from __future__ import annotations

import base64
import itertools
import json
import sys
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx

from engine.builtin.evm import Deployer, encode_constructor_args
from engine.builtin.money import amount_text
from engine.errors import PermanentError

TIMEOUT_SECONDS_DEFAULT = 30.0
TOO_MANY_REQUESTS = 429


class ServiceUnavailableError(Exception):
    """The service did not answer well this time (timeout, 5xx, 429): retrying may succeed."""


async def _post(client: httpx.AsyncClient, path: str, key: str, **kwargs: Any) -> httpx.Response:
    where = f"{str(client.base_url).rstrip('/')}{path}"
    try:
        response = await client.post(path, headers={"Idempotency-Key": key}, **kwargs)
    except httpx.TimeoutException as error:
        raise ServiceUnavailableError(f"{where}: no answer in time ({type(error).__name__})") from error
    except httpx.TransportError as error:
        raise ServiceUnavailableError(f"{where}: {error}") from error
    if response.is_server_error or response.status_code == TOO_MANY_REQUESTS:
        raise ServiceUnavailableError(f"{where} answered {response.status_code}: {response.text[:200]}")
    if response.is_error:
        raise PermanentError(f"{where} refused the request ({response.status_code}): {response.text[:200]}")
    return response


# What nodes answer when sent a transaction they already hold, or one already mined
# (geth, Nethermind, Erigon, Besu, anvil): the resend of a deployment whose first
# answer was lost. The node is then asked for the transaction by its hash.
ALREADY_SENT = ("already known", "known transaction", "alreadyknown", "already imported", "nonce too low")


def keccak_hex(raw: bytes) -> str:
    """A transaction's hash: keccak-256 of its signed bytes (eth-account's, the `chain` extra)."""
    digest: bytes = eth_account_library().keccak(raw)
    return "0x" + digest.hex()


def eth_account_library() -> SimpleNamespace:
    """eth-account's `Account` and `keccak` (the `chain` extra: imported only by a
    daemon that signs), keeping the process's recursion limit: py_ecc, which eth-account
    imports, raises it to 100,000 for itself, and with that limit a deeply nested JSON
    value could overflow the C stack of the daemon reading it instead of being refused."""
    limit = sys.getrecursionlimit()
    try:
        from eth_account import Account  # noqa: PLC0415
        from eth_utils.crypto import keccak  # noqa: PLC0415
    finally:
        sys.setrecursionlimit(limit)
    return SimpleNamespace(Account=Account, keccak=keccak)


class LocalKeySigner:
    """Signs with a private key held by the daemon (WORKFLOWD_CHAIN_PRIVATE_KEY), with
    eth-account."""

    def __init__(self, private_key: str) -> None:
        self.account = eth_account_library().Account.from_key(private_key)
        self.address: str = self.account.address

    async def sign(self, tx: dict[str, Any], *, idempotency_key: str) -> str:
        return "0x" + bytes(self.account.sign_transaction(tx).raw_transaction).hex()


class RemoteSigner:
    """Signs with `eth_signTransaction` on a signer that holds the key (Web3Signer,
    Clef, a node with the account unlocked) for `address`."""

    def __init__(self, rpc: JsonRpc, address: str) -> None:
        self.rpc = rpc
        self.address = address

    async def sign(self, tx: dict[str, Any], *, idempotency_key: str) -> str:
        as_sent = {key: hex(value) if isinstance(value, int) else value for key, value in tx.items()}
        signed = await self.rpc.call("eth_signTransaction", [as_sent | {"from": self.address}],
                                     idempotency_key=idempotency_key)  # fmt: skip
        raw = signed.get("raw") if isinstance(signed, dict) else signed  # geth answers {raw, tx}
        if not isinstance(raw, str) or not raw.startswith("0x"):
            raise PermanentError(
                f"eth_signTransaction answered {str(signed)[:200]}, not a signed transaction"
            )
        return raw


Signer = LocalKeySigner | RemoteSigner


class JsonRpc:
    """JSON-RPC 2.0 over HTTP; a JSON-RPC error is permanent (the node refused it)."""

    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS_DEFAULT) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout)
        self.ids = itertools.count(1)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.client.aclose()

    async def call(self, method: str, params: list[Any], *, idempotency_key: str) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        answer = (await _post(self.client, "", idempotency_key, json=body)).json()
        if "error" in answer:
            error = answer["error"]
            raise RpcRefusedError(method, error.get("message", str(error)), error.get("code"))
        return answer.get("result")


class RpcRefusedError(PermanentError):
    """The node answered a call with a JSON-RPC error."""

    def __init__(self, method: str, message: str, code: Any) -> None:
        super().__init__(f"{method} failed: {message} (code {code})")
        self.reason = message


class JsonRpcChain:
    """An EVM chain over JSON-RPC.

    Deployments (contract_deployment version 2) are signed by `signer`, a key the daemon
    holds or an outside signer, and sent as raw transactions, so that a resend is the
    same transaction. `deploy_contract` sends with eth_sendTransaction from `deployer`,
    for the deployments version 1 started before an upgrade.
    """

    def __init__(self, rpc: JsonRpc, signer: Signer | None, deployer: str | None = None) -> None:
        self.rpc = rpc
        self.signer = signer
        self.legacy_deployer = deployer or (signer.address if signer else None)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.rpc.aclose()
        if isinstance(self.signer, RemoteSigner) and self.signer.rpc is not self.rpc:
            await self.signer.rpc.aclose()

    async def call(self, method: str, params: list[Any], *, idempotency_key: str) -> Any:
        """One JSON-RPC call."""
        return await self.rpc.call(method, params, idempotency_key=idempotency_key)

    def _signer(self) -> Signer:
        if self.signer is None:
            raise PermanentError(
                "no signer: set WORKFLOWD_CHAIN_PRIVATE_KEY, or WORKFLOWD_CHAIN_DEPLOYER with a signer "
                "that holds its key (WORKFLOWD_CHAIN_SIGNER_URL)"
            )
        return self.signer

    async def deployer(self, *, idempotency_key: str) -> Deployer:
        address = self._signer().address
        chain_id = int(await self.call("eth_chainId", [], idempotency_key=idempotency_key), 16)
        pending = await self.call(
            "eth_getTransactionCount", [address, "pending"], idempotency_key=idempotency_key
        )
        return Deployer(chain_id, address, int(pending, 16))

    async def sign_deployment(
        self, data: str, nonce: int, deployer: Deployer, *, idempotency_key: str
    ) -> dict[str, str]:
        estimate = {"from": deployer.address, "data": data}
        gas = int(await self.call("eth_estimateGas", [estimate], idempotency_key=idempotency_key), 16)
        gas_price = int(await self.call("eth_gasPrice", [], idempotency_key=idempotency_key), 16)
        tx = {"nonce": nonce, "gasPrice": gas_price, "gas": gas, "value": 0, "data": data,
              "chainId": deployer.chain_id}  # fmt: skip
        raw = await self._signer().sign(tx, idempotency_key=idempotency_key)
        return {"rawTransaction": raw, "transactionHash": keccak_hex(bytes.fromhex(raw[2:]))}

    async def send_raw_transaction(self, raw_tx: str, *, idempotency_key: str) -> str:
        tx_hash = keccak_hex(bytes.fromhex(raw_tx.removeprefix("0x")))
        try:
            await self.call("eth_sendRawTransaction", [raw_tx], idempotency_key=idempotency_key)
        except RpcRefusedError as refused:
            if not any(phrase in refused.reason.lower() for phrase in ALREADY_SENT):
                raise
            # Sent before (its answer was lost) and held or mined since; or a different
            # transaction took the nonce, which the hash tells.
            known = await self.call("eth_getTransactionByHash", [tx_hash], idempotency_key=idempotency_key)
            if known is None:
                raise PermanentError(f"{refused}; and the node does not know transaction {tx_hash}") from None
        return tx_hash

    async def deploy_contract(
        self, bytecode: str, constructor_args: list[Any], *, idempotency_key: str
    ) -> str:
        if bytecode in ("", "0x"):
            raise PermanentError("the contract bytecode is empty")
        data = bytecode + encode_constructor_args(constructor_args)
        tx = {"from": self.legacy_deployer, "data": data}
        return str(await self.call("eth_sendTransaction", [tx], idempotency_key=idempotency_key))

    async def get_receipt(self, tx_hash: str, *, idempotency_key: str) -> dict[str, Any] | None:
        receipt = await self.call("eth_getTransactionReceipt", [tx_hash], idempotency_key=idempotency_key)
        if receipt is None:
            return None
        return {
            "status": int(receipt["status"], 16),
            "contractAddress": receipt.get("contractAddress"),
            "blockNumber": int(receipt["blockNumber"], 16),
        }

    async def get_code(self, address: str, *, idempotency_key: str) -> str:
        return str(await self.call("eth_getCode", [address, "latest"], idempotency_key=idempotency_key))

    async def block_number(self, *, idempotency_key: str) -> int:
        return int(await self.call("eth_blockNumber", [], idempotency_key=idempotency_key), 16)

    async def get_logs(self, from_block: int, to_block: int, *, idempotency_key: str) -> list[dict[str, Any]]:
        query = {"fromBlock": hex(from_block), "toBlock": hex(to_block)}
        logs = await self.call("eth_getLogs", [query], idempotency_key=idempotency_key)
        return [
            {
                "blockNumber": int(log["blockNumber"], 16),
                "logIndex": int(log["logIndex"], 16),
                "transactionHash": log["transactionHash"],
                "address": log["address"],
                "data": log["data"],
            }
            for log in logs
        ]


class OpenAICompatibleAI:
    """Audio transcription, chat completion and speech on an OpenAI-compatible API."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        chat_model: str,
        transcription_model: str,
        speech_model: str,
        voice: str = "alloy",
        timeout: float = TIMEOUT_SECONDS_DEFAULT,
    ) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {api_key}"}
        )
        self.chat_model = chat_model
        self.transcription_model = transcription_model
        self.speech_model = speech_model
        self.voice = voice

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.client.aclose()

    async def transcribe(self, audio_base64: str, *, idempotency_key: str) -> str:
        try:
            audio = base64.b64decode(audio_base64, validate=True)
        except ValueError:
            raise PermanentError("the audio is not valid base64") from None
        files = {"file": ("audio.wav", audio, "application/octet-stream")}
        response = await _post(
            self.client,
            "/audio/transcriptions",
            idempotency_key,
            files=files,
            data={"model": self.transcription_model},
        )
        return str(response.json()["text"])

    async def complete(self, prompt: str, *, idempotency_key: str) -> str:
        body = {"model": self.chat_model, "messages": [{"role": "user", "content": prompt}]}
        response = await _post(self.client, "/chat/completions", idempotency_key, json=body)
        return str(response.json()["choices"][0]["message"]["content"])

    async def speak(self, text: str, *, idempotency_key: str) -> str:
        body = {"model": self.speech_model, "input": text, "voice": self.voice}
        response = await _post(self.client, "/audio/speech", idempotency_key, json=body)
        return base64.b64encode(response.content).decode()


def exact_json(response: httpx.Response) -> Any:
    """A JSON answer with its numbers exact: amounts never pass through a float."""
    try:
        return json.loads(response.text, parse_float=Decimal)
    except ValueError:
        raise PermanentError(f"{response.request.url} answered {response.text[:200]!r}, not JSON") from None


class RestExchange:
    """An exchange over REST (the README's shape): `POST /trades`, then
    `POST /trades/{tradeId}/confirm` and, to undo, `POST /trades/{tradeId}/unwind`;
    amounts travel as decimal strings, each request with the step's Idempotency-Key."""

    def __init__(self, base_url: str, api_key: str, timeout: float = TIMEOUT_SECONDS_DEFAULT) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {api_key}"}
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.client.aclose()

    async def execute_trade(
        self, token_a: str, token_b: str, amount: Decimal, slippage: Decimal, *, idempotency_key: str
    ) -> dict[str, Any]:
        body = {"tokenIn": token_a, "tokenOut": token_b, "amountIn": amount_text(amount),
                "maxSlippage": amount_text(slippage)}  # fmt: skip
        trade = exact_json(await _post(self.client, "/trades", idempotency_key, json=body))
        return {
            "trade_id": str(trade["tradeId"]),
            "tradeHash": trade.get("tradeHash"),
            "amount_in": amount_text(Decimal(trade["amountIn"])),
            "amount_out": amount_text(Decimal(trade["amountOut"])),
            "price": amount_text(Decimal(trade["price"])),
            "slippage": amount_text(slippage),
        }

    async def confirm_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        answer = exact_json(await _post(self.client, f"/trades/{trade_id}/confirm", idempotency_key))
        if answer.get("status") == "pending":
            return {"trade_id": trade_id, "status": "pending"}
        if answer.get("status") != "settled":
            reason = answer.get("reason", "no reason given")
            raise PermanentError(f"trade {trade_id} did not settle ({answer.get('status')}): {reason}")
        return {"trade_id": trade_id, "status": "settled"}

    async def unwind_trade(self, trade_id: str, *, idempotency_key: str) -> dict[str, Any]:
        answer = exact_json(await _post(self.client, f"/trades/{trade_id}/unwind", idempotency_key))
        return {"trade_id": trade_id, "status": str(answer.get("status", "unwound"))}


class RestNotifier:
    """A notification service over REST (the README's shape): `POST /notifications`
    with {userId, message} and the step's Idempotency-Key, so that a retried step tells
    the user once."""

    def __init__(self, base_url: str, api_key: str, timeout: float = TIMEOUT_SECONDS_DEFAULT) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {api_key}"}
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.client.aclose()

    async def notify(self, user_id: str, message: str, *, idempotency_key: str) -> None:
        await _post(
            self.client, "/notifications", idempotency_key, json={"userId": user_id, "message": message}
        )
