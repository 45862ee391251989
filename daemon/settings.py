"""Settings, read once from the environment and validated into a frozen object.

The seed's names are accepted as they are (DATABASE_URL, DB_HOST, DB_PORT, DB_USERNAME,
DB_PASSWORD, DB_DATABASE, PORT); the daemon's own settings are prefixed WORKFLOWD_.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.retention import RetentionPolicy

DB_PORT_DEFAULT = 5432
HTTP_PORT_DEFAULT = 3000
HTTP_HOST_DEFAULT = "127.0.0.1"
CONCURRENCY_DEFAULT = 10
LEASE_SECONDS_DEFAULT = 30.0
POLL_INTERVAL_SECONDS_DEFAULT = 1.0
SHUTDOWN_GRACE_SECONDS_DEFAULT = 25.0
QUEUE_DEPTH_INTERVAL_SECONDS_DEFAULT = 15.0
STEP_TIMEOUT_SECONDS_DEFAULT = 300.0
STATEMENT_TIMEOUT_SECONDS_DEFAULT = 30.0
LOCK_TIMEOUT_SECONDS_DEFAULT = 5.0
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS_DEFAULT = 60.0
TCP_KEEPALIVE_SECONDS_DEFAULT = 10
# Unanswered keepalive probes, one every TCP_KEEPALIVE_INTERVAL_SECONDS, before the
# kernel gives a connection up.
TCP_KEEPALIVE_INTERVAL_SECONDS = 5
TCP_KEEPALIVE_PROBES = 3
# Per host of the connection string: a host that is down without refusing (a machine
# gone, packets dropped) must not hold a connection attempt for the kernel's two minutes
# before the next host in the list is tried.
CONNECT_TIMEOUT_SECONDS_DEFAULT = 5
# Long enough that guessing is hopeless (secrets.token_urlsafe(32) gives 43 characters).
ADMIN_TOKEN_MIN_LENGTH = 32
# The least time between two fetches of the JWKS of the admin API's bearer JWTs: tokens
# naming unknown keys (a rotation, or a flood of made-up key ids) fetch it at most this
# often.
JWT_JWKS_COOLDOWN_SECONDS_DEFAULT = 30.0
MAX_BODY_BYTES_DEFAULT = 1024 * 1024
# Far above what probes and operators need, so 200 slow clients leave room for the
# health probes; far below the usual limit of 1024 open files.
HTTP_MAX_CONNECTIONS_DEFAULT = 500
HTTP_HEAD_TIMEOUT_SECONDS_DEFAULT = 10.0
RETENTION_DAYS_DEFAULT = 30.0
FAILED_RETENTION_DAYS_DEFAULT = 90.0
RETENTION_INTERVAL_SECONDS_DEFAULT = 60.0
SCHEDULE_INTERVAL_SECONDS_DEFAULT = 1.0
EVENTS_EXCHANGE_DEFAULT = "workflowd.events"
EVENTS_URL_SCHEMES = ("amqp", "amqps")
# The password of a URL's user:password@, or of a connection string's password=...
PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@|(?<=password=)('[^']*'|\S+)")


class ConfigurationError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class JwtSettings:
    """What the admin API's bearer JWTs are verified against (Settings.jwt_settings)."""

    jwks_url: str
    issuer: str
    audience: str
    jwks_cooldown: float


class Settings(BaseSettings):
    """Everything the daemon and the CLI read from the environment."""

    model_config = SettingsConfigDict(env_prefix="WORKFLOWD_", frozen=True, extra="ignore")

    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    # A replica for the admin API's lists, search and stats (what dashboards poll), so
    # that they never load the primary; reads of one workflow stay on the primary, which
    # has every write a client was told of.
    read_database_url: str | None = None
    db_host: str | None = Field(None, validation_alias="DB_HOST")
    db_port: int = Field(DB_PORT_DEFAULT, validation_alias="DB_PORT")
    db_username: str | None = Field(None, validation_alias="DB_USERNAME")
    db_password: SecretStr | None = Field(None, validation_alias="DB_PASSWORD")
    db_database: str | None = Field(None, validation_alias="DB_DATABASE")
    port: int = Field(HTTP_PORT_DEFAULT, validation_alias="PORT", ge=0, le=65535)
    host: str = HTTP_HOST_DEFAULT
    # Apply pending migrations at start. Off (`workflowd run --no-migrate`) for daemons
    # whose database role may not change the schema: they wait until someone has run
    # `workflowd migrate` with a role that may.
    migrate: bool = True
    # Comma-separated module names whose top-level Workflow objects are registered.
    modules: Annotated[tuple[str, ...], NoDecode] = ()
    # Steps one process runs at once.
    concurrency: int = Field(CONCURRENCY_DEFAULT, ge=1, le=10_000)
    # How long a claim holds a workflow without a heartbeat; renewed every third of it.
    lease_seconds: float = Field(LEASE_SECONDS_DEFAULT, gt=0)
    # How often an idle daemon looks for due work besides LISTEN/NOTIFY (retries, lost
    # notifications).
    poll_interval: float = Field(POLL_INTERVAL_SECONDS_DEFAULT, gt=0)
    # How long in-flight steps may finish after SIGTERM before their leases are released.
    shutdown_grace: float = Field(SHUTDOWN_GRACE_SECONDS_DEFAULT, ge=0)
    # Bounds every attempt of a step that sets no timeout of its own, so that a hung
    # step cannot hold its workflow's lease forever.
    step_timeout: float = Field(STEP_TIMEOUT_SECONDS_DEFAULT, gt=0)
    # Every database session of the daemon and the CLI: no statement runs longer, no lock
    # is waited for longer, no transaction sits idle longer (a transactional step's code
    # runs inside one: it must finish within this), and a dead peer is noticed after
    # tcp_keepalive seconds of silence plus three unanswered probes 5 s apart.
    statement_timeout: float = Field(STATEMENT_TIMEOUT_SECONDS_DEFAULT, gt=0)
    lock_timeout: float = Field(LOCK_TIMEOUT_SECONDS_DEFAULT, gt=0)
    idle_in_transaction_timeout: float = Field(IDLE_IN_TRANSACTION_TIMEOUT_SECONDS_DEFAULT, gt=0)
    tcp_keepalive: int = Field(TCP_KEEPALIVE_SECONDS_DEFAULT, ge=1)
    # Serve the five built-in workflow types (contract_deployment, trade_execution,
    # ai_job_chain, indexing_verification, reward_grant).
    builtins: bool = True
    # Their outside services: deterministic sandboxes, or real services over HTTP.
    adapters: Literal["sandbox", "http"] = "sandbox"
    # Sandbox realism for demos and tests: latency per call, and a rate of injected
    # transient failures (0 to 1).
    sandbox_latency_ms: float = Field(0.0, ge=0)
    sandbox_failure_rate: float = Field(0.0, ge=0, le=1)
    # The HTTP adapters: an EVM JSON-RPC node, an OpenAI-compatible AI API, and, when
    # their URLs are set, an exchange and a notifier over REST (else sandboxes).
    # Deployments are signed with `chain_private_key` (eth-account, the `chain` extra),
    # or by a signer that holds the key of `chain_deployer` (`eth_signTransaction` on
    # `chain_signer_url`, by default the node itself: Web3Signer, Clef, an unlocked node).
    chain_rpc_url: str | None = None
    chain_deployer: str | None = None
    chain_private_key: SecretStr | None = None
    chain_signer_url: str | None = None
    exchange_url: str | None = None
    exchange_api_key: SecretStr | None = None
    notifier_url: str | None = None
    notifier_api_key: SecretStr | None = None
    ai_base_url: str | None = None
    ai_api_key: SecretStr | None = None
    ai_chat_model: str = "gpt-4o-mini"
    ai_transcription_model: str = "whisper-1"
    ai_speech_model: str = "tts-1"
    http_timeout: float = Field(30.0, gt=0)
    # The bearer token of the admin API, given as is or in a file (systemd's
    # LoadCredential=); without one the admin endpoints answer 503. Read it with
    # admin_token_value(), which enforces the rules.
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    # Bearer JWTs (OAuth2 access tokens) for the admin API, besides or instead of the
    # token: signed by a key of the JWKS at jwt_jwks_url, issued by jwt_issuer for
    # jwt_audience (both required with a URL). Read them with jwt_settings(), which
    # enforces the rules.
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_cooldown: float = Field(JWT_JWKS_COOLDOWN_SECONDS_DEFAULT, gt=0)
    # The largest request body the HTTP server accepts; larger ones are refused with 413
    # before they are read.
    max_body_bytes: int = Field(MAX_BODY_BYTES_DEFAULT, ge=0)
    # Open HTTP connections at most; requests beyond them are answered 503.
    http_max_connections: int = Field(HTTP_MAX_CONNECTIONS_DEFAULT, ge=1)
    # How long a client may take to send a request's head (from its connection, or from
    # the first byte after a response); then the connection is closed, so that clients
    # that never finish a head cannot hold connections up to the cap.
    http_head_timeout: float = Field(HTTP_HEAD_TIMEOUT_SECONDS_DEFAULT, gt=0)
    # How often the one exporting daemon refreshes the queue-depth gauges.
    queue_depth_interval: float = Field(QUEUE_DEPTH_INTERVAL_SECONDS_DEFAULT, gt=0)
    # Retention: completed, cancelled and compensated workflows are deleted (with their
    # steps and timeline) this many days after they finished, failed ones (which wait
    # for an operator) after failed_retention_days; 0 keeps them for ever. The daemons
    # prune every retention_interval seconds, one at a time.
    retention_days: float = Field(RETENTION_DAYS_DEFAULT, ge=0)
    failed_retention_days: float = Field(FAILED_RETENTION_DAYS_DEFAULT, ge=0)
    retention_interval: float = Field(RETENTION_INTERVAL_SECONDS_DEFAULT, gt=0)
    # How often each daemon looks for due cron schedules (one fires each tick).
    schedule_interval: float = Field(SCHEDULE_INTERVAL_SECONDS_DEFAULT, gt=0)
    # The event relay: every committed timeline transition is published to this broker
    # (amqp:// or amqps://, RabbitMQ), on a durable topic exchange of this name, by one
    # daemon at a time. Unset: no relay.
    events_url: SecretStr | None = None
    events_exchange: str = Field(EVENTS_EXCHANGE_DEFAULT, min_length=1, max_length=255)
    # Log lines as JSON (the default off a terminal) or for humans (on a terminal).
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url", "read_database_url")
    @classmethod
    def _parse_as_conninfo(cls, value: str | None) -> str | None:
        # Refused at once, naming its variable, not at the first connection as a bare
        # libpq error (after `dev` has started its admin API, say).
        if value is not None:
            try:
                conninfo_to_dict(value)
            except psycopg.Error as error:
                reason = without_password(" ".join(str(error).split()))
                raise ValueError(
                    f"not a connection string such as postgresql://user:password@host:5432/db ({reason})"
                ) from None
        return value

    @field_validator("events_url")
    @classmethod
    def _an_amqp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in EVENTS_URL_SCHEMES:
            raise ValueError("not a broker URL such as amqp://user:password@host:5672/vhost")
        return value

    @field_validator("modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    def retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy.from_days(self.retention_days, self.failed_retention_days)

    def admin_token_value(self) -> str | None:
        """The admin token (from WORKFLOWD_ADMIN_TOKEN or the file of WORKFLOWD_ADMIN_TOKEN_FILE),
        or None for none; a ConfigurationError if both are set, the file cannot be read,
        or the token is too short."""
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ConfigurationError(
                "both WORKFLOWD_ADMIN_TOKEN and WORKFLOWD_ADMIN_TOKEN_FILE are set: set only one"
            )
        if self.admin_token_file is not None:
            token = read_token_file(self.admin_token_file)
            source = f"WORKFLOWD_ADMIN_TOKEN_FILE ({self.admin_token_file})"
        elif self.admin_token is not None:
            token, source = self.admin_token.get_secret_value(), "WORKFLOWD_ADMIN_TOKEN"
        else:
            return None
        if len(token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ConfigurationError(
                f"the admin token of {source} has {len(token)} characters, fewer than "
                f"{ADMIN_TOKEN_MIN_LENGTH}: use a long random secret, e.g. "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return token

    def jwt_settings(self) -> JwtSettings | None:
        """How the admin API verifies bearer JWTs, or None when WORKFLOWD_JWT_JWKS_URL is
        not set; a ConfigurationError if the issuer or the audience is missing (a token
        of any issuer, or meant for any other service of that issuer, must not pass), or
        the URL is not https (http only on a loopback address: whoever can alter the keys
        in transit can mint tokens)."""
        url, issuer, audience = self.jwt_jwks_url or None, self.jwt_issuer or None, self.jwt_audience or None
        if url is None:
            if issuer is not None or audience is not None:
                given = "WORKFLOWD_JWT_ISSUER" if issuer is not None else "WORKFLOWD_JWT_AUDIENCE"
                raise ConfigurationError(
                    f"{given} is set but WORKFLOWD_JWT_JWKS_URL is not: set the URL of your identity "
                    f"provider's JWKS too, or unset {given}"
                )
            return None
        if issuer is None or audience is None:
            missing = " and ".join(name for name, value in (("WORKFLOWD_JWT_ISSUER", issuer),
                                   ("WORKFLOWD_JWT_AUDIENCE", audience)) if value is None)  # fmt: skip
            raise ConfigurationError(
                f"WORKFLOWD_JWT_JWKS_URL is set but {missing} not: set the issuer (the tokens' "
                "iss) and the audience (their aud: this API's identifier) as well"
            )
        try:
            parts = urlsplit(url)
            scheme, host = parts.scheme, parts.hostname
        except ValueError:  # an unclosed [IPv6 address, say
            scheme, host = "", None
        if not host or not (scheme == "https" or (scheme == "http" and is_loopback(host))):
            raise ConfigurationError(
                f"WORKFLOWD_JWT_JWKS_URL={url} is not an https:// URL (http:// only on a loopback "
                "address): the keys that verify the tokens must not be alterable in transit"
            )
        return JwtSettings(url, issuer, audience, self.jwt_jwks_cooldown)

    def conninfo(self) -> str:
        """The libpq connection string: DATABASE_URL, else one built from the DB_* names."""
        if self.database_url:
            return self.database_url
        if self.db_host:
            return make_conninfo(
                host=self.db_host,
                port=self.db_port,
                user=self.db_username,
                password=self.db_password.get_secret_value() if self.db_password else None,
                dbname=self.db_database,
            )
        raise ConfigurationError(
            "no database configured: set DATABASE_URL (postgresql://user:password@host:5432/db) "
            "or DB_HOST, DB_PORT, DB_USERNAME, DB_PASSWORD and DB_DATABASE"
        )


def with_session_limits(conninfo: str, settings: Settings) -> str:
    """`conninfo` with the session timeouts, TCP keepalives and a connect timeout; options
    the connection string already sets come first, so ours win, except its own
    connect_timeout."""
    parts = conninfo_to_dict(conninfo)
    limits = {
        "statement_timeout": settings.statement_timeout,
        "lock_timeout": settings.lock_timeout,
        "idle_in_transaction_session_timeout": settings.idle_in_transaction_timeout,
    }
    ours = " ".join(f"-c {name}={round(seconds * 1000)}" for name, seconds in limits.items())
    silence = settings.tcp_keepalive + TCP_KEEPALIVE_INTERVAL_SECONDS * TCP_KEEPALIVE_PROBES
    return make_conninfo(
        conninfo,
        options=f"{parts.get('options') or ''} {ours}".strip(),
        keepalives=1,
        keepalives_idle=settings.tcp_keepalive,
        keepalives_interval=TCP_KEEPALIVE_INTERVAL_SECONDS,
        keepalives_count=TCP_KEEPALIVE_PROBES,
        # Also bounds a send that the peer never acknowledges (a link cut mid-write).
        tcp_user_timeout=silence * 1000,
        connect_timeout=parts.get("connect_timeout") or CONNECT_TIMEOUT_SECONDS_DEFAULT,
    )


def read_token_file(path: Path) -> str:
    """A secret from a file, without the one trailing newline that editors and echo add."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigurationError(f"cannot read WORKFLOWD_ADMIN_TOKEN_FILE {path}: {reason}") from None
    return text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")


def is_loopback(host: str) -> bool:
    """Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def without_password(text: str) -> str:
    """`text` with any password of a connection string in it as ***, for messages."""
    return PASSWORD.sub(lambda found: f"{found[1]}:***@" if found[1] is not None else "***", text)


def unreachable(settings: Settings, conninfo: str, error: Exception) -> str:
    """The one line for a database that did not answer: where, from which settings, why."""
    reason = " ".join(str(error).split()) or type(error).__name__
    source = "DATABASE_URL" if settings.database_url else "DB_HOST, DB_PORT, DB_USERNAME, DB_DATABASE"
    return f"cannot reach the database at {describe_database(conninfo)} (from {source}): {reason}"


def describe_database(conninfo: str) -> str:
    """user@host:port/dbname of a connection string, without its password, for messages."""
    try:
        parts = conninfo_to_dict(conninfo)
    except Exception:
        return "the configured database"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = parts.get("port") or DB_PORT_DEFAULT
    return f"{user}{host}:{port}/{parts.get('dbname') or ''}"
