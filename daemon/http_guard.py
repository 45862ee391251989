"""The gate in front of the HTTP application: the admin token, then the size of the body.

Both are decided on the request's head, before a byte of its body is read. FastAPI reads
and parses a body before the route's dependencies run, so a token checked there would
let anyone make the daemon read (and hold) whatever they send; here an unauthenticated
or oversized request is answered at once and its connection closed, unread.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_PATH_PREFIX = "/admin"
ADMIN_DISABLED_MESSAGE = (
    "the admin API is disabled because no token is configured: set WORKFLOWD_ADMIN_TOKEN to a long "
    "random secret and send it as 'Authorization: Bearer <token>'"
)
UNAUTHORIZED_MESSAGE = "a valid 'Authorization: Bearer <token>' header is required"


def problem(status_code: int, detail: str, *, close: bool = False, **extra: Any) -> JSONResponse:
    """An error answer: {"detail": ...}; `close` ends the connection after it (a body the
    client may still be sending is then never read)."""
    headers = {"WWW-Authenticate": "Bearer"} if status_code == status.HTTP_401_UNAUTHORIZED else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"detail": detail, **extra}, status_code=status_code, headers=headers)


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PATH_PREFIX or path.startswith(ADMIN_PATH_PREFIX + "/")


def bearer_token_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token` as its bearer token, compared in
    constant time (the time taken says nothing about how much of a guess was right)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return secrets.compare_digest(given.strip().encode(), token.encode())


def declared_length(headers: Headers) -> int | None:
    """The Content-Length of a request, if it gives a valid one."""
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def may_carry_body(headers: Headers) -> bool:
    return (declared_length(headers) or 0) > 0 or "transfer-encoding" in headers


def too_large(max_body_bytes: int) -> JSONResponse:
    return problem(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the request body is larger than {max_body_bytes} bytes (WORKFLOWD_MAX_BODY_BYTES)",
        close=True,
    )


class RequestGuard:
    """ASGI middleware: the one place where the admin token and the body cap are enforced."""

    def __init__(self, app: ASGIApp, *, admin_token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["path"], Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = CappedBody(scope, receive, send, self.max_body_bytes)
        await self.app(scope, body.receive, body.send)

    def refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        """The answer a request gets on its head alone, if it must be refused."""
        if is_admin_path(path):
            close = may_carry_body(headers)
            if self.admin_token is None:
                return problem(status.HTTP_503_SERVICE_UNAVAILABLE, ADMIN_DISABLED_MESSAGE, close=close)
            if not bearer_token_matches(headers.get("authorization"), self.admin_token):
                return problem(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED_MESSAGE, close=close)
        if (declared_length(headers) or 0) > self.max_body_bytes:
            return too_large(self.max_body_bytes)
        return None


class CappedBody:
    """One request's body, counted as the application reads it (a chunked body has no
    Content-Length to check beforehand). Past the cap it answers 413 itself, closes the
    connection, and tells the application that the client has gone."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, max_body_bytes: int) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.max_body_bytes = max_body_bytes
        self.received = 0
        self.cut = False
        self.answered = False
        self.response_started = False

    async def receive(self) -> Message:
        if self.cut:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_body_bytes:
                await self.cut_off()
                return {"type": "http.disconnect"}
        return message

    async def cut_off(self) -> None:
        self.cut = True
        if not self.response_started:
            await too_large(self.max_body_bytes)(self.scope, self._receive, self._send)
            self.answered = True

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the application's answer to a body cut short: the 413 went instead
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)
