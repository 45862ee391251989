"""Clients of real services over HTTP: an EVM JSON-RPC chain and an OpenAI-compatible AI
service. Every request carries the step's idempotency key as an `Idempotency-Key`
header and has a timeout. Server errors, rate limits and timeouts raise
`ServiceUnavailableError` (the step is retried); other refusals raise PermanentError.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from typing import Any

import httpx

from engine.errors import PermanentError

TIMEOUT_SECONDS_DEFAULT = 30.0
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
WORD_BYTES = 32


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
    if response.status_code in RETRYABLE_STATUS:
        raise ServiceUnavailableError(f"{where} answered {response.status_code}: {response.text[:200]}")
    if response.is_error:
        raise PermanentError(f"{where} refused the request ({response.status_code}): {response.text[:200]}")
    return response


def encode_constructor_args(args: list[Any]) -> str:
    """ABI-encode constructor arguments given as unsigned integers or 32-byte hex words."""
    words = []
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, int | str):
            raise PermanentError(
                f"constructor argument {arg!r}: give an unsigned integer or a 32-byte hex word"
            )
        if isinstance(arg, int):
            if arg < 0 or arg >= 2 ** (8 * WORD_BYTES):
                raise PermanentError(f"constructor argument {arg} does not fit a uint256")
            words.append(arg.to_bytes(WORD_BYTES, "big").hex())
        else:
            try:
                word = binascii.unhexlify(arg.removeprefix("0x"))
            except (binascii.Error, ValueError):
                raise PermanentError(f"constructor argument {arg!r} is not hex") from None
            if len(word) != WORD_BYTES:
                raise PermanentError(f"constructor argument {arg!r} is not a 32-byte word")
            words.append(word.hex())
    return "".join(words)


class JsonRpcChain:
    """An EVM chain over JSON-RPC.

    Deployments are sent with eth_sendTransaction from `deployer`: the node, or a signing
    proxy in front of it (Web3Signer, EthSigner), holds the key. send_raw_transaction
    is there for callers that sign themselves.
    """

    def __init__(self, url: str, deployer: str, timeout: float = TIMEOUT_SECONDS_DEFAULT) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout)
        self.deployer = deployer
        self.ids = itertools.count(1)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.client.aclose()

    async def call(self, method: str, params: list[Any], *, idempotency_key: str) -> Any:
        """One JSON-RPC call; a JSON-RPC error is permanent (the node refused it)."""
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        answer = (await _post(self.client, "", idempotency_key, json=body)).json()
        if "error" in answer:
            error = answer["error"]
            raise PermanentError(f"{method} failed: {error.get('message', error)} (code {error.get('code')})")
        return answer.get("result")

    async def send_raw_transaction(self, raw_tx: str, *, idempotency_key: str) -> str:
        return str(await self.call("eth_sendRawTransaction", [raw_tx], idempotency_key=idempotency_key))

    async def deploy_contract(
        self, bytecode: str, constructor_args: list[Any], *, idempotency_key: str
    ) -> str:
        if bytecode in ("", "0x"):
            raise PermanentError("the contract bytecode is empty")
        data = bytecode + encode_constructor_args(constructor_args)
        tx = {"from": self.deployer, "data": data}
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
