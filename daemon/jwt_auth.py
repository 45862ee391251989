"""Bearer JWTs of the admin API: OAuth2 access tokens, verified with the keys of the
identity provider's JWKS.

A token passes when its signature verifies with the key its `kid` names, by an
asymmetric algorithm that fits that key (never `none`, never HS*: an HMAC "signed" with
the public key would otherwise verify), it is issued by WORKFLOWD_JWT_ISSUER for
WORKFLOWD_JWT_AUDIENCE, has not expired (30 s of clock skew allowed), and names its
subject. Its scopes come from the standard `scope` claim (space-separated).

The JWKS is fetched with httpx's async client, never blocking the event loop, within
JWKS_FETCH_TIMEOUT_SECONDS; it is kept JWKS_MAX_AGE_SECONDS, fetched again at once for a
key id it lacks (a rotation), but never twice within the cooldown, so that tokens with
made-up key ids cannot make the daemon hammer the identity provider. A provider that
does not answer makes a token neither valid nor invalid: JwksUnavailableError (503).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import structlog

from daemon.settings import JwtSettings

LOG = structlog.get_logger("workflowd")

READ_SCOPE = "workflows:read"
WRITE_SCOPE = "workflows:write"
ALL_SCOPES = frozenset({READ_SCOPE, WRITE_SCOPE})
LEEWAY_SECONDS = 30
JWKS_MAX_AGE_SECONDS = 600.0
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# Longer subjects are refused rather than written into every timeline row they act on.
SUBJECT_MAX_LENGTH = 256
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# The algorithms a key may verify, by its type and curve: the only ones accepted at all.
ALGORITHMS_BY_KEY: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): RSA_ALGORITHMS,
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
ALGORITHMS = frozenset().union(*ALGORITHMS_BY_KEY.values())


class TokenRefusedError(Exception):
    """The token is refused (401); the message says why, and holds none of its contents."""


class JwksUnavailableError(Exception):
    """The keys to verify the token cannot be had now (503)."""


@dataclass(frozen=True)
class Principal:
    """Who an admin request acts as: a JWT's subject with its scopes, or the holder of
    the static admin token (no subject, every scope)."""

    subject: str | None
    scopes: frozenset[str]


ADMIN_TOKEN_HOLDER = Principal(subject=None, scopes=ALL_SCOPES)


def key_algorithms(jwk: dict[str, Any]) -> frozenset[str]:
    """The accepted algorithms a JWK may verify: none for an HMAC secret, an encryption
    key or a key of a type not listed."""
    if jwk.get("use", "sig") != "sig":
        return frozenset()
    kty, crv = jwk.get("kty"), jwk.get("crv")
    found = ALGORITHMS_BY_KEY.get((str(kty), None if kty == "RSA" else str(crv)), frozenset())
    declared = jwk.get("alg")
    if declared is None:
        return found
    return found & {declared} if isinstance(declared, str) else frozenset()


class Jwks:
    """The identity provider's signing keys, cached; fetched on first use, when older
    than JWKS_MAX_AGE_SECONDS, and for a key id not among them, at most once per
    `cooldown` seconds."""

    def __init__(
        self,
        url: str,
        *,
        cooldown: float,
        max_age: float = JWKS_MAX_AGE_SECONDS,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.cooldown = cooldown
        self.max_age = max_age
        self.timeout = timeout
        self.clock = clock
        self._keys: list[dict[str, Any]] = []
        self._built: dict[tuple[int, str], jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._error: str | None = None  # why the last attempt failed, if it did
        # One fetch at a time: requests that need one while it runs wait for its keys.
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key `kid` names, bound to `algorithm`; TokenRefusedError if the JWKS has no
        such key or the key does not take that algorithm, JwksUnavailableError if the
        JWKS cannot be fetched and the key is not among those known."""
        if self._fetched_at is None:
            await self._refresh("first use")
        elif self.clock() - self._fetched_at >= self.max_age and not self._lock.locked():
            await self._refresh("max age")  # meanwhile the old keys serve
        index = self._find(kid)
        if index is None:
            await self._refresh("unknown key id")
            index = self._find(kid)
        if index is None:
            if self._error is not None:
                raise JwksUnavailableError(f"cannot fetch the JWKS at {self.url}: {self._error}")
            raise TokenRefusedError(
                "its key id is not in the JWKS" if kid is not None
                else "it names no key id (kid) and the JWKS has several keys"
            )  # fmt: skip
        jwk = self._keys[index]
        if algorithm not in key_algorithms(jwk):
            raise TokenRefusedError(f"its algorithm {algorithm} does not fit its key")
        if (index, algorithm) not in self._built:
            try:
                self._built[index, algorithm] = jwt.PyJWK(jwk, algorithm)
            except jwt.PyJWTError:
                raise TokenRefusedError("its key in the JWKS cannot be read") from None
        return self._built[index, algorithm]

    def _find(self, kid: str | None) -> int | None:
        if kid is None:
            return 0 if len(self._keys) == 1 else None
        return next((index for index, jwk in enumerate(self._keys) if jwk.get("kid") == kid), None)

    async def _refresh(self, reason: str) -> None:
        async with self._lock:
            now = self.clock()
            if self._attempted_at is not None and now - self._attempted_at < self.cooldown:
                return  # too soon, or done by the request this one waited behind
            self._attempted_at = now
            try:
                keys = await self._fetch()
            except JwksUnavailableError as error:
                self._error = str(error)
                LOG.warning("jwks_fetch_failed", url=self.url, reason=reason, error=self._error,
                            kept_keys=len(self._keys))  # fmt: skip
                return
            self._keys, self._built, self._fetched_at, self._error = keys, {}, now, None
            LOG.info("jwks_fetched", url=self.url, reason=reason, keys=[jwk.get("kid") for jwk in keys])

    async def _fetch(self) -> list[dict[str, Any]]:
        """The usable signing keys of the JWKS document, or JwksUnavailableError."""
        try:
            # The client's timeout bounds each read; this bounds the whole exchange.
            async with asyncio.timeout(self.timeout), httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
        except (TimeoutError, httpx.TimeoutException):
            raise JwksUnavailableError(f"no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as error:
            raise JwksUnavailableError(" ".join(str(error).split()) or type(error).__name__) from None
        if response.status_code != httpx.codes.OK:
            raise JwksUnavailableError(f"HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise JwksUnavailableError("the answer is not JSON") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise JwksUnavailableError('the answer has no "keys" list')
        usable = [jwk for jwk in keys if isinstance(jwk, dict) and key_algorithms(jwk)]
        if not usable:
            raise JwksUnavailableError(f"none of its {len(keys)} keys is an RSA, EC or Ed25519 signing key")
        return usable


class JwtVerifier:
    """Verifies the admin API's bearer JWTs (see the module's docstring)."""

    def __init__(self, settings: JwtSettings) -> None:
        self.issuer = settings.issuer
        self.audience = settings.audience
        self.jwks = Jwks(settings.jwks_url, cooldown=settings.jwks_cooldown)

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; TokenRefusedError or JwksUnavailableError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefusedError("it is neither the admin token nor a JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            shown = str(algorithm)[:16]
            raise TokenRefusedError(f"its algorithm {shown!r} is not accepted (only RS*, PS*, ES*, EdDSA)")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefusedError("its key id (kid) is not a string")
        key = await self.jwks.key(kid, algorithm)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefusedError("it has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRefusedError(f"it is not meant for this audience ({self.audience})") from None
        except jwt.InvalidIssuerError:
            raise TokenRefusedError(f"it is not issued by {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise TokenRefusedError("its signature does not verify") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefusedError("it is not valid yet (nbf or iat in the future)") from None
        except jwt.MissingRequiredClaimError as error:
            raise TokenRefusedError(f"it has no {error.claim} claim") from None
        except jwt.PyJWTError as error:
            raise TokenRefusedError(str(error).replace('"', "'")) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= SUBJECT_MAX_LENGTH:
            raise TokenRefusedError(f"its subject is not a string of 1 to {SUBJECT_MAX_LENGTH} characters")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise TokenRefusedError("its scope claim is not a space-separated string")
        return Principal(subject=subject, scopes=frozenset(scope.split()))
