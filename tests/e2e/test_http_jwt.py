"""Bearer JWTs on the admin API of a running daemon: tokens minted here with the test's
own keys, their JWKS served by the test on a loopback port. Scopes against reads and
writes, every way a token can be wrong, the subject as the timeline's actor, key
rotation and its rate-limited refresh, the static token beside JWTs, and an identity
provider that is down or never answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from daemon.jwt_auth import JWKS_FETCH_TIMEOUT_SECONDS
from daemon.local_postgres import free_port
from tests.e2e.conftest import Daemon, Daemons, wait_until
from tests.integration.test_cli import assert_one_line_error, workflowd

TOKEN = "test-token-" + uuid.uuid4().hex
ISSUER = "https://idp.example/"
AUDIENCE = "workflowd-admin"
READ = "workflows:read"
WRITE = "workflows:write"
UNSERVED_START = {"type": "nobody_serves_this", "input": {}, "allow_unserved": True}
COOLDOWN_SECONDS = 2.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class IdentityProvider:
    """Keys, the JWKS that publishes their public halves over HTTP on 127.0.0.1, and
    tokens signed with them. Counts the fetches of its JWKS."""

    keys: dict[str, Any] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    server: ThreadingHTTPServer | None = None

    def add_rsa(self, kid: str) -> rsa.RSAPrivateKey:
        key = new_rsa_key()
        self.publish(kid, key, RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))  # no "alg": RS* or PS*
        return key

    def add_ec(self, kid: str) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        self.publish(kid, key, ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "ES256"})
        return key

    def publish(self, kid: str, key: Any, jwk: dict[str, Any]) -> None:
        self.keys[kid] = key
        self.published.append(jwk | {"kid": kid, "use": "sig"})

    def mint(
        self, scope: str | None = READ, *, kid: str = "rsa-1", algorithm: str = "RS256", key: Any = None,
        lifetime: int | None = 300, **claims: Any,
    ) -> str:  # fmt: skip
        """A token of `scope`; a claim given as None is left out."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice@example.com", "iat": now,
                                "exp": None if lifetime is None else now + lifetime, "scope": scope} | claims  # fmt: skip
        body = {name: value for name, value in body.items() if value is not None}
        return jwt.encode(body, key or self.keys[kid], algorithm=algorithm, headers={"kid": kid})

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def serve(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps({"keys": provider.published}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.add_rsa("rsa-1")
    provider.add_ec("ec-1")
    provider.serve()
    try:
        yield provider
    finally:
        provider.close()


def jwt_daemon(daemons: Daemons, jwks_url: str, **settings: Any) -> Daemon:
    return daemons.start(
        admin_token=TOKEN, jwt_jwks_url=jwks_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **settings
    )


@pytest.fixture
def daemon(daemons: Daemons, idp: IdentityProvider) -> Daemon:
    return jwt_daemon(daemons, idp.url, jwt_jwks_cooldown=COOLDOWN_SECONDS)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_read_token_reads_and_is_refused_every_write(
    daemon: Daemon, idp: IdentityProvider, db: psycopg.Connection[Any]
) -> None:
    reader = bearer(idp.mint(READ))
    for path in ("/admin/workflows", "/admin/workflows/stats/overview", "/admin/schedules", "/admin/limits"):
        assert httpx.get(daemon.url + path, headers=reader).status_code == 200, path
    some_id = uuid.uuid4()
    writes = [
        ("POST", "/admin/workflows", UNSERVED_START),
        ("POST", f"/admin/workflows/{some_id}/cancel", None),
        ("POST", f"/admin/workflows/{some_id}/retry", None),
        ("POST", f"/admin/workflows/{some_id}/compensate", None),
        ("POST", f"/admin/workflows/{some_id}/events", {"name": "approved"}),
        ("PATCH", f"/admin/workflows/{some_id}", {"priority": 1}),
        ("POST", "/admin/schedules", {"name": "n", "cron": "0 3 * * *", "type": "t"}),
        ("DELETE", "/admin/schedules/n", None),
        ("PUT", "/admin/limits/t", {"max_concurrency": 1}),
        ("DELETE", "/admin/limits/t", None),
    ]
    for method, path, body in writes:
        refused = httpx.request(method, daemon.url + path, headers=reader, json=body)
        assert refused.status_code == 403, (method, path)
        assert refused.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
        assert f'scope="{WRITE}"' in refused.headers["www-authenticate"]
        assert f"do not include {WRITE}" in refused.json()["detail"]
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)
    # Scopes are separate: a token that may write may not read without workflows:read.
    writer_only = bearer(idp.mint(WRITE))
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=writer_only).status_code == 403
    # An EC key works as well as an RSA one, and PS256 with an RSA key that names no alg.
    for token in (idp.mint(READ, kid="ec-1", algorithm="ES256"), idp.mint(READ, algorithm="PS256")):
        assert httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(token)).status_code == 200


def test_a_write_token_acts_as_its_subject(
    daemon: Daemon, idp: IdentityProvider, db: psycopg.Connection[Any]
) -> None:
    operator = bearer(idp.mint(f"openid {READ} {WRITE}", sub="ops|alice"))
    # The subject is who acts: a name the caller gives is not taken over it.
    headers = operator | {"X-Workflowd-Actor": "mallory"}
    with httpx.Client(base_url=daemon.url, headers=headers, timeout=10) as api:
        started = api.post("/admin/workflows", json=UNSERVED_START)
        assert started.status_code == 201
        workflow_id = started.json()["id"]
        assert api.post(f"/admin/workflows/{workflow_id}/cancel").json()["state"] == "cancelled"
        assert api.get(f"/admin/workflows/{workflow_id}/timeline").status_code == 200
    actors = db.execute(
        "SELECT actor FROM workflow_events WHERE workflow_id = %s AND to_state = 'cancelled'", (workflow_id,)
    ).fetchall()
    assert actors == [("ops|alice",)]
    audit = [
        (event["command"], event["actor"])
        for event in daemon.log_events()
        if event["event"] == "admin_command"
    ]
    assert audit == [("start", "ops|alice"), ("cancel", "ops|alice")]


def hand_signed(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    """A token put together by hand, as an attacker would: PyJWT refuses to make these."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def test_every_kind_of_bad_token_is_refused_with_401(
    daemon: Daemon, idp: IdentityProvider, db: psycopg.Connection[Any]
) -> None:
    good_claims = jwt.decode(idp.mint(f"{READ} {WRITE}"), options={"verify_signature": False})
    public_pem = (
        idp.keys["rsa-1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bad = {
        "expired": idp.mint(lifetime=-120),  # beyond the 30 s of leeway
        "wrong audience": idp.mint(aud="another-service"),
        "wrong issuer": idp.mint(iss="https://evil.example/"),
        "alg none": hand_signed({"alg": "none", "typ": "JWT"}, good_claims, lambda _: b""),
        "HS256 signed with the public key": hand_signed(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, good_claims,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "bad signature": idp.mint(key=new_rsa_key()),
        "unknown key id": idp.mint(kid="nobody-knows", key=new_rsa_key()),
        "algorithm that does not fit the key": idp.mint(kid="ec-1", key=idp.keys["rsa-1"]),
        "no exp": idp.mint(lifetime=None),
        "no subject": idp.mint(sub=None),
        "not yet valid": idp.mint(nbf=int(time.time()) + 600),
        "not a JWT": "not-a-jwt-and-not-the-admin-token",
    }  # fmt: skip
    expected_reasons = {
        "expired": "it has expired", "wrong audience": "not meant for this audience",
        "wrong issuer": f"not issued by {ISSUER}", "alg none": "algorithm 'none' is not accepted",
        "HS256 signed with the public key": "algorithm 'HS256' is not accepted",
        "bad signature": "signature does not verify", "unknown key id": "key id is not in the JWKS",
        "algorithm that does not fit the key": "algorithm RS256 does not fit its key",
        "no exp": "it has no exp claim", "no subject": "it has no sub claim", "not yet valid": "not valid yet",
        "not a JWT": "neither the admin token nor a JWT",
    }  # fmt: skip
    for name, token in bad.items():
        for method, path in (("GET", "/admin/workflows"), ("POST", "/admin/workflows")):
            answer = httpx.request(method, daemon.url + path, headers=bearer(token), json=UNSERVED_START)
            assert answer.status_code == 401, (name, method, answer.text)
            challenge = answer.headers["www-authenticate"]
            assert challenge.startswith('Bearer error="invalid_token", error_description="'), name
            assert expected_reasons[name] in answer.json()["detail"], (name, answer.json())
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)
    missing = httpx.get(f"{daemon.url}/admin/workflows")
    assert (missing.status_code, missing.headers["www-authenticate"]) == (401, "Bearer")
    # One line per refusal, and never a token in the log.
    refusals = [event for event in daemon.log_events() if event["event"] == "admin_request_refused"]
    assert len(refusals) == 2 * len(bad) + 1
    log = daemon.log_path.read_text()
    for token in bad.values():
        assert token not in log
        assert token.rsplit(".", 1)[-1] not in log or token.endswith(".")


def test_a_new_key_is_fetched_for_its_token_but_never_more_than_once_per_cooldown(
    daemon: Daemon, idp: IdentityProvider
) -> None:
    assert idp.fetches == 0  # fetched on first use, not at start
    began = time.monotonic()
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(idp.mint())).status_code == 200
    assert idp.fetches == 1
    rotated = idp.add_rsa("rsa-2")
    # A flood of made-up key ids: refused, fetching the JWKS at most once per cooldown.
    with ThreadPoolExecutor(8) as pool:
        flood = list(pool.map(
            lambda _: httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(
                idp.mint(kid=f"made-up-{uuid.uuid4().hex}", key=rotated))).status_code,
            range(40),
        ))  # fmt: skip
    elapsed = time.monotonic() - began
    assert flood == [401] * 40
    assert idp.fetches <= 1 + math.floor(elapsed / COOLDOWN_SECONDS), (idp.fetches, elapsed)
    # The rotated key's token passes as soon as the cooldown allows one more fetch.
    new_token = bearer(idp.mint(kid="rsa-2"))
    wait_until(
        lambda: httpx.get(f"{daemon.url}/admin/workflows", headers=new_token).status_code == 200,
        COOLDOWN_SECONDS + 10, "the token of the rotated key to pass", 0.1,
    )  # fmt: skip
    assert idp.fetches == 2
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(idp.mint())).status_code == 200
    fetched = [event for event in daemon.log_events() if event["event"] == "jwks_fetched"]
    assert [event["keys"] for event in fetched] == [["rsa-1", "ec-1"], ["rsa-1", "ec-1", "rsa-2"]]


def test_the_static_token_still_works_beside_jwts(
    daemon: Daemon, idp: IdentityProvider, db: psycopg.Connection[Any]
) -> None:
    static = bearer(TOKEN) | {"X-Workflowd-Actor": "bob"}
    started = httpx.post(f"{daemon.url}/admin/workflows", headers=static, json=UNSERVED_START)
    assert started.status_code == 201
    workflow_id = started.json()["id"]
    assert httpx.post(f"{daemon.url}/admin/workflows/{workflow_id}/cancel", headers=static).status_code == 200
    assert db.execute(
        "SELECT actor FROM workflow_events WHERE workflow_id = %s AND to_state = 'cancelled'", (workflow_id,)
    ).fetchall() == [("bob via admin-api:127.0.0.1",)]
    assert idp.fetches == 0  # the static token needs no keys
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(idp.mint())).status_code == 200


def test_the_openapi_document_names_the_bearer_scheme_and_each_operation_s_scope(daemon: Daemon) -> None:
    document = httpx.get(f"{daemon.url}/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "WORKFLOWD_ADMIN_TOKEN" in scheme["description"]
    assert "WORKFLOWD_JWT_JWKS_URL" in scheme["description"]
    paths = document["paths"]
    assert paths["/admin/workflows"]["get"]["security"] == [{"HTTPBearer": [READ]}]
    assert paths["/admin/workflows"]["post"]["security"] == [{"HTTPBearer": [WRITE]}]
    assert paths["/admin/limits/{type}"]["put"]["security"] == [{"HTTPBearer": [WRITE]}]
    assert paths["/admin/schedules/{name}"]["delete"]["security"] == [{"HTTPBearer": [WRITE]}]
    assert "security" not in paths["/healthz"]["get"]
    assert "403" in paths["/admin/workflows"]["post"]["responses"]


def timed_get(url: str, headers: dict[str, str]) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    answer = httpx.get(url, headers=headers, timeout=30)
    return answer, time.monotonic() - began


def test_an_identity_provider_that_is_down_gets_a_quick_clear_503(
    daemons: Daemons, idp: IdentityProvider
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    daemon = jwt_daemon(daemons, nobody)
    answer, took = timed_get(f"{daemon.url}/admin/workflows", bearer(idp.mint()))
    assert answer.status_code == 503, answer.text
    assert took < 3
    assert answer.json()["detail"].startswith(
        f"cannot verify the bearer JWT now: cannot fetch the JWKS at {nobody}: "
    )
    assert answer.headers["retry-after"] == "30"
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=bearer(TOKEN)).status_code == 200
    [failed] = [event for event in daemon.log_events() if event["event"] == "jwks_fetch_failed"]
    assert failed["url"] == nobody


def test_an_identity_provider_that_never_answers_holds_no_request_long(
    daemons: Daemons, idp: IdentityProvider
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
        daemon = jwt_daemon(daemons, url)
        token = bearer(idp.mint())
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: timed_get(f"{daemon.url}/admin/workflows", token), range(4)))
        for answer, took in answers:
            assert answer.status_code == 503, answer.text
            assert took < JWKS_FETCH_TIMEOUT_SECONDS + 3
        details = {answer.json()["detail"] for answer, _ in answers}
        assert details == {
            f"cannot verify the bearer JWT now: cannot fetch the JWKS at {url}: no answer within 5 s"
        }
        # Within the cooldown the next token is refused at once, without another wait.
        answer, took = timed_get(f"{daemon.url}/admin/workflows", token)
        assert (answer.status_code, took < 1) == (503, True)
        assert httpx.get(f"{daemon.url}/healthz").status_code == 200
        assert len([event for event in daemon.log_events() if event["event"] == "jwks_fetch_failed"]) == 1


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"jwt_jwks_url": "https://idp.example/jwks"}, "WORKFLOWD_JWT_JWKS_URL is set but WORKFLOWD_JWT_ISSUER and WORKFLOWD_JWT_AUDIENCE not"),
        ({"jwt_issuer": ISSUER}, "WORKFLOWD_JWT_ISSUER is set but WORKFLOWD_JWT_JWKS_URL is not"),
        ({"jwt_jwks_url": "http://idp.example/jwks", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}, "is not an https:// URL"),
    ],
)  # fmt: skip
def test_incomplete_jwt_settings_refuse_to_start_in_one_line(
    db_url: str, settings: dict[str, str], expected: str
) -> None:
    env = {"DATABASE_URL": db_url, "WORKFLOWD_MODULES": "tests.e2e.flows", "PORT": str(free_port())}
    env |= {f"WORKFLOWD_{name.upper()}": value for name, value in settings.items()}
    assert_one_line_error(workflowd("run", env=env), 2, expected)
