"""Simulated outside services for the tests: a fake EVM JSON-RPC node and a fake
OpenAI-compatible API, served by uvicorn in a thread on loopback. Deterministic; they
record every request (path, method, Idempotency-Key) and can be told to fail or stall."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from daemon.local_postgres import free_port


@dataclass
class Behaviour:
    """What the fake does next: fail the next N calls of a path with a status, or stall."""

    failures: dict[str, list[int]] = field(default_factory=dict)
    stall_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)

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


def fake_chain(behaviour: Behaviour) -> FastAPI:
    """A fake EVM node: deployments are mined at once; blocks hold one log each."""
    app = FastAPI()

    @app.post("/")
    async def rpc(request: Request) -> Response:
        body = await request.json()
        method, params = body["method"], body["params"]
        if (refused := await behaviour.before(request, method)) is not None:
            return refused
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
            "eth_sendRawTransaction": "0x" + "cd" * 32,
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
