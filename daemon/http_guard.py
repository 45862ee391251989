"""The gate in front of the HTTP application: the admin token or a bearer JWT, the scope
the request needs, then the size of the body.

All are decided on the request's head, before a byte of its body is read. FastAPI reads
and parses a body before the route's dependencies run, so a token checked there would
let anyone make the daemon read (and hold) whatever they send; here an unauthenticated,
unauthorized or oversized request is answered at once and its connection closed, unread.

Which scope a request needs is decided here alone, by its method (`required_scope`):
reads are GET and HEAD, every other method writes.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any

import structlog
from fastapi import status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.jwt_auth import (
    ADMIN_TOKEN_HOLDER,
    READ_SCOPE,
    WRITE_SCOPE,
    JwksUnavailableError,
    JwtVerifier,
    Principal,
    TokenRefusedError,
)

LOG = structlog.get_logger("workflowd")
ADMIN_PATH_PREFIX = "/admin"
ADMIN_DISABLED_MESSAGE = (
    "the admin API is disabled because no token is configured: set WORKFLOWD_ADMIN_TOKEN to a long "
    "random secret and send it as 'Authorization: Bearer <token>', or WORKFLOWD_JWT_JWKS_URL (with "
    "WORKFLOWD_JWT_ISSUER and WORKFLOWD_JWT_AUDIENCE) to accept your identity provider's JWTs"
)
UNAUTHORIZED_MESSAGE = "a valid 'Authorization: Bearer <token>' header is required"
READ_METHODS = frozenset({"GET", "HEAD"})
# Where the guard leaves the principal of an admin request, in the ASGI scope's state.
PRINCIPAL_STATE_KEY = "workflowd_principal"
# What RFC 6750 allows in a quoted error_description.
NOT_IN_A_DESCRIPTION = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def required_scope(method: str) -> str:
    """The scope an admin request of this method needs: the one rule of the admin API's
    authorization. GET and HEAD read; every other method (POST, PUT, PATCH, DELETE, and
    any a route may add) writes."""
    return READ_SCOPE if method.upper() in READ_METHODS else WRITE_SCOPE


def principal_of(scope: Scope) -> Principal | None:
    """The principal the guard admitted an admin request as (None outside /admin)."""
    principal = scope.get("state", {}).get(PRINCIPAL_STATE_KEY)
    return principal if isinstance(principal, Principal) else None


def problem(
    status_code: int,
    detail: str,
    *,
    close: bool = False,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An error answer: {"detail": ...}; `close` ends the connection after it (a body the
    client may still be sending is then never read). A 401 says `WWW-Authenticate: Bearer`
    unless `headers` say more."""
    answer_headers = {"WWW-Authenticate": "Bearer"} if status_code == status.HTTP_401_UNAUTHORIZED else {}
    answer_headers |= headers or {}
    if close:
        answer_headers["Connection"] = "close"
    return JSONResponse({"detail": detail, **extra}, status_code=status_code, headers=answer_headers)


def bearer_challenge(error: str, description: str, **params: str) -> dict[str, str]:
    """The WWW-Authenticate header of RFC 6750 for a refused token."""
    quoted = {"error": error, **params, "error_description": NOT_IN_A_DESCRIPTION.sub("?", description)}
    return {"WWW-Authenticate": "Bearer " + ", ".join(f'{name}="{value}"' for name, value in quoted.items())}


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PATH_PREFIX or path.startswith(ADMIN_PATH_PREFIX + "/")


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header ("" for none)."""
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def bearer_token_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token` as its bearer token, compared in
    constant time (the time taken says nothing about how much of a guess was right)."""
    return secrets.compare_digest(bearer_token(authorization).encode(), token.encode())


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
    """ASGI middleware: the one place where the admin API's authentication, its scopes
    and the body cap are enforced."""

    def __init__(
        self, app: ASGIApp, *, admin_token: str | None, max_body_bytes: int, jwt: JwtVerifier | None = None
    ) -> None:
        self.app = app
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes
        self.jwt = jwt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = await self.refusal(scope, Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = CappedBody(scope, receive, send, self.max_body_bytes)
        await self.app(scope, body.receive, body.send)

    async def refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """The answer a request gets on its head alone, if it must be refused; an admin
        request that passes carries its principal in the scope's state."""
        if is_admin_path(scope["path"]):
            refused = await self.admitted(scope, headers)
            if refused is not None:
                return refused
        if (declared_length(headers) or 0) > self.max_body_bytes:
            return too_large(self.max_body_bytes)
        return None

    async def admitted(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """Authenticate an admin request and check its scope: None when it may go on (its
        principal then in the scope's state), else its refusal, logged in one line that
        says what was wrong, never the token."""
        close = may_carry_body(headers)
        if self.admin_token is None and self.jwt is None:
            return problem(status.HTTP_503_SERVICE_UNAVAILABLE, ADMIN_DISABLED_MESSAGE, close=close)
        try:
            principal = await self.authenticate(headers.get("authorization"))
            needed = required_scope(scope["method"])
            if needed not in principal.scopes:
                reason = f"the token's scopes do not include {needed}, which a {scope['method']} needs"
                challenge = bearer_challenge("insufficient_scope", reason, scope=needed)
                raise Refusal(status.HTTP_403_FORBIDDEN, reason, challenge, subject=principal.subject)
        except Refusal as refusal:
            refusal.log(scope)
            return problem(refusal.status_code, refusal.detail, close=close, headers=refusal.headers)
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
        return None

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a request's bearer token: the admin token's holder, or a
        valid JWT's subject; else a Refusal."""
        if self.admin_token is not None and bearer_token_matches(authorization, self.admin_token):
            return ADMIN_TOKEN_HOLDER
        token = bearer_token(authorization)
        if not token:  # RFC 6750: no error code for a request without credentials
            raise Refusal(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED_MESSAGE, reason="no bearer token")
        if self.jwt is None:
            challenge = bearer_challenge("invalid_token", "not the admin token")
            raise Refusal(
                status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED_MESSAGE, challenge, reason="not the admin token"
            )
        try:
            return await self.jwt.verify(token)
        except TokenRefusedError as error:
            challenge = bearer_challenge("invalid_token", str(error))
            raise Refusal(
                status.HTTP_401_UNAUTHORIZED, f"the bearer token is refused: {error}", challenge
            ) from None
        except JwksUnavailableError as error:
            # Neither valid nor invalid: the client may try again once the keys can be had.
            retry = {"Retry-After": str(math.ceil(self.jwt.jwks.cooldown))}
            detail = f"cannot verify the bearer JWT now: {error}"
            raise Refusal(status.HTTP_503_SERVICE_UNAVAILABLE, detail, retry) from None


class Refusal(Exception):
    """An admin request refused by the guard: its answer, and the facts of its log line."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        headers: dict[str, str] | None = None,
        *,
        reason: str | None = None,
        **facts: Any,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers or {}
        self.reason = reason or detail
        self.facts = facts

    def log(self, scope: Scope) -> None:
        client = scope.get("client")
        LOG.warning("admin_request_refused", status=self.status_code, reason=self.reason,
                    method=scope["method"], path=scope["path"], client=client[0] if client else None,
                    **self.facts)  # fmt: skip


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
