"""Simulated outside services for the tests: a fake EVM JSON-RPC node, a fake
OpenAI-compatible API, a fake exchange and a fake notifier, served by uvicorn in a
thread on loopback. Deterministic; they record every request (path, method,
Idempotency-Key) and can be told to fail, stall, or lose an answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import rlp  # type: ignore[import-untyped]  # eth-account's RLP, untyped
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from daemon.local_postgres import free_port
from engine.builtin.chain import CONFIRMATIONS
from engine.builtin.http_clients import eth_account_library

# Imported the daemon's way, which keeps this process's recursion limit (tests of deep
# JSON rely on it).
Account = eth_account_library().Account
keccak = eth_account_library().keccak


@dataclass
class Behaviour:
    """What the fake does next: fail the next N calls of a path with a status, stall, or
    do the next N calls of a path and then lose their answers (stall `lost_answer_seconds`
    after doing the work, past the client's timeout)."""

    failures: dict[str, list[int]] = field(default_factory=dict)
    stall_seconds: float = 0.0
    lost_answers: dict[str, int] = field(default_factory=dict)
    lost_answer_seconds: float = 3.0
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def after(self, name: str) -> None:
        """Called once the work of a call is done: loses its answer if told to."""
        if self.lost_answers.get(name):
            self.lost_answers[name] -= 1
            await asyncio.sleep(self.lost_answer_seconds)

    async def before(self, request: Request, name: str) -> Response | None:
        self.requests.append({"name": name, "key": request.headers.get("idempotency-key"),
                              "authorization": request.headers.get("authorization")})  # fmt: skip
        if self.stall_seconds:
            await asyncio.sleep(self.stall_seconds)
        if self.failures.get(name):
            status = self.failures[name].pop(0)
            return JSONResponse({"error": {"message": f"simulated {status}"}}, status_code=status)
        return None

    def keys(self, name: str) -> list[str | None]:
        return [r["key"] for r in self.requests if r["name"] == name]


# The key of the account the fake node holds, for eth_signTransaction (as an unlocked
# geth account or a Web3Signer would).
NODE_KEY = "0x" + "4c" * 32
CHAIN_ID = 1337


@dataclass
class Mempool:
    """The fake node's transactions, by hash: each raw transaction it ever accepted, with
    the sender recovered from its signature. A deployment is mined as it arrives."""

    transactions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def accept(self, raw: str) -> dict[str, Any]:
        """Accept a signed transaction; an error object for one it holds already, or one
        whose nonce its sender used."""
        tx_hash = "0x" + keccak(bytes.fromhex(raw[2:])).hex()
        if tx_hash in self.transactions:
            return {"error": {"code": -32000, "message": "already known"}}
        sender = Account.recover_transaction(raw)
        nonce = rlp_nonce(raw)
        if nonce < self.pending_nonce(sender):
            return {"error": {"code": -32000, "message": "nonce too low"}}
        self.transactions[tx_hash] = {"hash": tx_hash, "from": sender, "nonce": nonce, "raw": raw}
        return {"result": tx_hash}

    def pending_nonce(self, address: str) -> int:
        return sum(1 for tx in self.transactions.values() if tx["from"].lower() == address.lower())

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        tx = self.transactions.get(tx_hash)
        if tx is None:
            return None
        address = "0x" + keccak(f"{tx['from']}:{tx['nonce']}".encode()).hex()[-40:]
        return {"status": "0x1", "contractAddress": address, "blockNumber": hex(100 + tx["nonce"])}


def rlp_nonce(raw: str) -> int:
    """The nonce of a signed legacy transaction (its first RLP field)."""
    fields = rlp.decode(bytes.fromhex(raw[2:]))
    return int.from_bytes(fields[0], "big")


def fake_chain(behaviour: Behaviour, mempool: Mempool | None = None) -> FastAPI:
    """A fake EVM node: deployments are mined at once; blocks hold one log each. Signed
    transactions go to `mempool`; it signs for the account of NODE_KEY."""
    app = FastAPI()
    pool = mempool or Mempool()
    node_account = Account.from_key(NODE_KEY)

    def answer(body: dict[str, Any], outcome: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"jsonrpc": "2.0", "id": body["id"], **outcome})

    async def signing(method: str, params: list[Any]) -> dict[str, Any] | None:
        if method == "eth_chainId":
            return {"result": hex(CHAIN_ID)}
        if method == "eth_getTransactionCount":
            return {"result": hex(pool.pending_nonce(params[0]))}
        if method == "eth_gasPrice":
            return {"result": hex(1_000_000_000)}
        if method == "eth_estimateGas":
            return {"result": hex(200_000)}
        if method == "eth_signTransaction":
            tx = {key: int(value, 16) if key != "data" else value
                  for key, value in params[0].items() if key != "from"}  # fmt: skip
            if params[0]["from"].lower() != node_account.address.lower():
                return {"error": {"code": -32000, "message": "unknown account"}}
            return {"result": "0x" + bytes(node_account.sign_transaction(tx).raw_transaction).hex()}
        if method == "eth_sendRawTransaction":
            outcome = pool.accept(params[0])
            await behaviour.after(method)
            return outcome
        if method == "eth_getTransactionByHash":
            tx = pool.transactions.get(params[0])
            return {"result": tx and {"hash": tx["hash"], "from": tx["from"], "nonce": hex(tx["nonce"])}}
        if method == "eth_getTransactionReceipt" and params[0] in pool.transactions:
            return {"result": pool.receipt(params[0])}
        if method == "eth_blockNumber" and pool.transactions:  # the pool's blocks, confirmed
            return {"result": hex(100 + len(pool.transactions) + CONFIRMATIONS)}
        return None

    @app.post("/")
    async def rpc(request: Request) -> Response:
        body = await request.json()
        method, params = body["method"], body["params"]
        if (refused := await behaviour.before(request, method)) is not None:
            return refused
        if (signed := await signing(method, params)) is not None:
            return answer(body, signed)
        if method == "eth_sendTransaction" and params[0]["data"] == "0xdead":
            return JSONResponse(
                {
                    "jsonrpc": "2.0",
                    "id": body["id"],
                    "error": {"code": -32000, "message": "execution reverted"},
                }
            )
        results: dict[str, Any] = {
            "eth_sendTransaction": "0x" + "ab" * 32,
            "eth_getTransactionReceipt": {
                "status": "0x1",
                "contractAddress": "0x" + "12" * 20,
                "blockNumber": "0x10",
            },
            "eth_getCode": "0x60806040",
            "eth_blockNumber": "0x20",
        }
        if method == "eth_getLogs":
            start, end = int(params[0]["fromBlock"], 16), int(params[0]["toBlock"], 16)
            results[method] = [
                {
                    "blockNumber": hex(b),
                    "logIndex": "0x0",
                    "transactionHash": f"0x{b:064x}",
                    "address": "0x" + "34" * 20,
                    "data": "0x01",
                }
                for b in range(start, end + 1)
            ]
        return JSONResponse({"jsonrpc": "2.0", "id": body["id"], "result": results[method]})

    return app


def fake_ai(behaviour: Behaviour) -> FastAPI:
    """A fake OpenAI-compatible API."""
    app = FastAPI()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        if (refused := await behaviour.before(request, "transcriptions")) is not None:
            return refused
        async with request.form() as form:  # closes the uploaded file's spool
            audio = await form["file"].read()  # type: ignore[union-attr]
            return JSONResponse({"text": f"heard {len(audio)} bytes with {form['model']}"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if (refused := await behaviour.before(request, "chat")) is not None:
            return refused
        body = await request.json()
        answer = f"{body['model']} says: {body['messages'][0]['content'][-30:]}"
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        if (refused := await behaviour.before(request, "speech")) is not None:
            return refused
        body = await request.json()
        return Response(f"voice:{body['voice']}:{body['input']}".encode(), media_type="audio/mpeg")

    return app


@dataclass
class ExchangeBook:
    """The fake exchange's trades by id, and the Idempotency-Keys it has answered: a key
    seen before gets its first answer again, as a real exchange deduplicates."""

    trades: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Confirmations asked before a trade settles: `pending` is answered until then.
    checks_to_settle: int = 1


PRICE = Decimal("2000.12345678")


def fake_exchange(behaviour: Behaviour, book: ExchangeBook) -> FastAPI:
    """A fake exchange with the README's REST shape; amounts as decimal strings. A trade
    asking for less than 0.1 % slippage executes, then is rejected at confirmation; a
    trade is `pending` at its first `book.checks_to_settle - 1` confirmations."""
    app = FastAPI()

    async def once(request: Request, name: str, work: Callable[[], dict[str, Any]]) -> Response:
        if (refused := await behaviour.before(request, name)) is not None:
            return refused
        key = (name, request.headers.get("idempotency-key", ""))
        if key not in book.answers:
            book.answers[key] = work()
        await behaviour.after(name)
        return JSONResponse(book.answers[key])

    @app.post("/trades")
    async def trade(request: Request) -> Response:
        body = await request.json()

        def execute() -> dict[str, Any]:
            trade_id = f"t{len(book.trades) + 1}"
            amount = Decimal(body["amountIn"])
            book.trades[trade_id] = {"status": "executed", "amountIn": body["amountIn"],
                                     "tight": Decimal(body["maxSlippage"]) < Decimal("0.001")}  # fmt: skip
            return {"tradeId": trade_id, "tradeHash": "0x" + keccak(trade_id.encode()).hex(),
                    "amountIn": body["amountIn"], "amountOut": str(amount * PRICE), "price": str(PRICE)}  # fmt: skip

        return await once(request, "trades", execute)

    @app.post("/trades/{trade_id}/confirm")
    async def confirm(trade_id: str, request: Request) -> Response:
        checked = book.trades[trade_id]
        checked["checks"] = checked.get("checks", 0) + 1
        if checked["checks"] < book.checks_to_settle:  # a status, not an action: never cached
            return JSONResponse({"tradeId": trade_id, "status": "pending"})

        def settle() -> dict[str, Any]:
            trade = book.trades[trade_id]
            if trade["tight"]:
                return {
                    "tradeId": trade_id,
                    "status": "rejected",
                    "reason": "price moved beyond the slippage",
                }
            trade["status"] = "settled"
            return {"tradeId": trade_id, "status": "settled"}

        return await once(request, "confirm", settle)

    @app.post("/trades/{trade_id}/unwind")
    async def unwind(trade_id: str, request: Request) -> Response:
        def undo() -> dict[str, Any]:
            book.trades[trade_id]["status"] = "unwound"
            return {"tradeId": trade_id, "status": "unwound"}

        return await once(request, "unwind", undo)

    return app


def fake_notifier(behaviour: Behaviour, delivered: list[dict[str, Any]]) -> FastAPI:
    """A fake notifier: delivers each Idempotency-Key's message once; users named
    unknown-* do not exist (404)."""
    app = FastAPI()

    @app.post("/notifications")
    async def notify(request: Request) -> Response:
        if (refused := await behaviour.before(request, "notifications")) is not None:
            return refused
        body = await request.json()
        if body["userId"].startswith("unknown-"):
            return JSONResponse({"error": f"no user {body['userId']}"}, status_code=404)
        key = request.headers.get("idempotency-key")
        if all(message["key"] != key for message in delivered):
            delivered.append({"key": key, **body})
        return JSONResponse({"status": "queued"}, status_code=202)

    return app


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
