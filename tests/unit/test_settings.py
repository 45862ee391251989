"""Settings read from the environment: the database, the HTTP port, the workflow modules."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError

from daemon.settings import (
    DB_PORT_DEFAULT,
    HTTP_HOST_DEFAULT,
    HTTP_MAX_CONNECTIONS_DEFAULT,
    HTTP_PORT_DEFAULT,
    JWT_JWKS_COOLDOWN_SECONDS_DEFAULT,
    MAX_BODY_BYTES_DEFAULT,
    ConfigurationError,
    JwtSettings,
    Settings,
    describe_database,
)

SETTING_NAMES = {
    "database_url",
    "db_host",
    "db_port",
    "db_username",
    "db_password",
    "db_database",
    "port",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable Settings reads (names are matched case-insensitively)."""
    for name in list(os.environ):
        lowered = name.lower()
        if lowered in SETTING_NAMES or lowered.startswith("workflowd_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.database_url is None
    assert settings.db_port == DB_PORT_DEFAULT
    assert settings.port == HTTP_PORT_DEFAULT
    assert settings.host == HTTP_HOST_DEFAULT
    assert settings.modules == ()
    assert (settings.max_body_bytes, settings.http_max_connections) == (1_048_576, 500)
    assert (MAX_BODY_BYTES_DEFAULT, HTTP_MAX_CONNECTIONS_DEFAULT) == (1_048_576, 500)
    assert settings.admin_token_value() is None


def test_database_url_wins_over_the_db_names(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://alice:secret@db.example:5433/orders"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DB_HOST", "other.example")
    monkeypatch.setenv("DB_DATABASE", "other")
    assert Settings().conninfo() == url


def test_the_db_names_build_a_conninfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "db.example")
    monkeypatch.setenv("DB_PORT", "6543")
    monkeypatch.setenv("DB_USERNAME", "alice")
    monkeypatch.setenv("DB_PASSWORD", "it's a 'secret'")
    monkeypatch.setenv("DB_DATABASE", "orders")
    parts = conninfo_to_dict(Settings().conninfo())
    assert parts == {
        "host": "db.example",
        "port": "6543",
        "user": "alice",
        "password": "it's a 'secret'",
        "dbname": "orders",
    }


def test_db_host_alone_uses_the_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "localhost")
    assert conninfo_to_dict(Settings().conninfo()) == {"host": "localhost", "port": "5432"}


def test_an_empty_database_url_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("DB_HOST", "db.example")
    assert conninfo_to_dict(Settings().conninfo())["host"] == "db.example"


def test_no_database_is_a_configuration_error_that_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings().conninfo()
    message = str(raised.value)
    assert "no database configured" in message
    for name in ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_USERNAME", "DB_PASSWORD", "DB_DATABASE"):
        assert name in message
    assert "postgresql://" in message


def test_db_names_without_a_host_are_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_USERNAME", "alice")
    monkeypatch.setenv("DB_DATABASE", "orders")
    with pytest.raises(ConfigurationError, match="DB_HOST"):
        Settings().conninfo()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a, b,,c", ("a", "b", "c")),
        ("flows.payments", ("flows.payments",)),
        (" one ,two , ", ("one", "two")),
        ("", ()),
        (" , ", ()),
    ],
)
def test_workflowd_modules_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("WORKFLOWD_MODULES", value)
    assert Settings().modules == expected


def test_modules_may_be_given_as_a_sequence() -> None:
    assert Settings(modules=("a", "b")).modules == ("a", "b")


def test_port_and_host_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("WORKFLOWD_HOST", "0.0.0.0")
    settings = Settings()
    assert settings.port == 8080
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("name", "value"), [("PORT", "http"), ("PORT", "70000"), ("PORT", "-1"), ("DB_PORT", "x")]
)
def test_a_bad_port_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_the_password_is_kept_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "db.example")
    monkeypatch.setenv("DB_PASSWORD", "hunter2")
    settings = Settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
    assert "hunter2" in settings.conninfo()


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("conninfo", "expected"),
    [
        ("postgresql://alice:secret@db.example:5433/orders", "alice@db.example:5433/orders"),
        (
            "host=db.example port=5433 user=alice password=secret dbname=orders",
            "alice@db.example:5433/orders",
        ),
        ("postgresql://db.example/orders", "db.example:5432/orders"),
        ("dbname=orders", "localhost:5432/orders"),
        ("", "localhost:5432/"),
    ],
)
def test_describe_database_hides_the_password(conninfo: str, expected: str) -> None:
    description = describe_database(conninfo)
    assert description == expected
    assert "secret" not in description


def test_describe_database_of_the_built_conninfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "db.example")
    monkeypatch.setenv("DB_USERNAME", "alice")
    monkeypatch.setenv("DB_PASSWORD", "hunter2")
    monkeypatch.setenv("DB_DATABASE", "orders")
    assert describe_database(Settings().conninfo()) == "alice@db.example:5432/orders"


def test_describe_database_of_an_unreadable_conninfo() -> None:
    description = describe_database("postgresql://alice:secret@[broken")
    assert description == "the configured database"


LONG_TOKEN = "t" * 32


def test_the_admin_token_must_have_32_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN", LONG_TOKEN)
    assert Settings().admin_token_value() == LONG_TOKEN
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN", LONG_TOKEN[1:])
    with pytest.raises(ConfigurationError, match="WORKFLOWD_ADMIN_TOKEN has 31 characters, fewer than 32"):
        Settings().admin_token_value()


@pytest.mark.parametrize(
    ("written", "token"),
    [
        (LONG_TOKEN, LONG_TOKEN),
        (LONG_TOKEN + "\n", LONG_TOKEN),
        (LONG_TOKEN + "\r\n", LONG_TOKEN),
        (LONG_TOKEN + " \n\n", LONG_TOKEN + " \n"),  # only one newline goes: the rest is the secret
    ],
)
def test_the_admin_token_file_loses_one_trailing_newline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, written: str, token: str
) -> None:
    path = tmp_path / "token"
    path.write_bytes(written.encode())
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN_FILE", str(path))
    assert Settings().admin_token_value() == token


def test_admin_token_file_errors_are_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(LONG_TOKEN)
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN_FILE", str(path))
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN", LONG_TOKEN)
    with pytest.raises(ConfigurationError, match="both WORKFLOWD_ADMIN_TOKEN and WORKFLOWD_ADMIN_TOKEN_FILE"):
        Settings().admin_token_value()
    monkeypatch.delenv("WORKFLOWD_ADMIN_TOKEN")
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(
        ConfigurationError, match=r"cannot read WORKFLOWD_ADMIN_TOKEN_FILE .*missing: No such file"
    ):
        Settings().admin_token_value()
    path.write_bytes(b"\xff" * 40)
    monkeypatch.setenv("WORKFLOWD_ADMIN_TOKEN_FILE", str(path))
    with pytest.raises(ConfigurationError, match="not UTF-8 text"):
        Settings().admin_token_value()
    path.write_text("short\n")
    with pytest.raises(ConfigurationError, match=r"WORKFLOWD_ADMIN_TOKEN_FILE \(.*\) has 5 characters"):
        Settings().admin_token_value()


JWKS_URL = "https://idp.example/.well-known/jwks.json"


def test_jwts_are_off_by_default_and_configured_by_url_issuer_and_audience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().jwt_settings() is None
    monkeypatch.setenv("WORKFLOWD_JWT_JWKS_URL", "")  # set but empty, as compose files do: off
    assert Settings().jwt_settings() is None
    monkeypatch.setenv("WORKFLOWD_JWT_JWKS_URL", JWKS_URL)
    monkeypatch.setenv("WORKFLOWD_JWT_ISSUER", "https://idp.example/")
    monkeypatch.setenv("WORKFLOWD_JWT_AUDIENCE", "workflowd-admin")
    assert Settings().jwt_settings() == JwtSettings(
        JWKS_URL, "https://idp.example/", "workflowd-admin", JWT_JWKS_COOLDOWN_SECONDS_DEFAULT
    )
    monkeypatch.setenv("WORKFLOWD_JWT_JWKS_COOLDOWN", "5")
    settings = Settings().jwt_settings()
    assert settings is not None
    assert settings.jwks_cooldown == 5
    for loopback in ("http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]:9/jwks"):
        monkeypatch.setenv("WORKFLOWD_JWT_JWKS_URL", loopback)
        assert Settings().jwt_settings() is not None, loopback
    monkeypatch.setenv("WORKFLOWD_JWT_JWKS_COOLDOWN", "0")
    with pytest.raises(ValidationError, match="jwt_jwks_cooldown"):
        Settings()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"URL": JWKS_URL}, "WORKFLOWD_JWT_JWKS_URL is set but WORKFLOWD_JWT_ISSUER and WORKFLOWD_JWT_AUDIENCE not"),
        ({"URL": JWKS_URL, "ISSUER": "i"}, "WORKFLOWD_JWT_JWKS_URL is set but WORKFLOWD_JWT_AUDIENCE not"),
        ({"URL": JWKS_URL, "AUDIENCE": "a", "ISSUER": ""}, "is set but WORKFLOWD_JWT_ISSUER not"),
        ({"ISSUER": "i"}, "WORKFLOWD_JWT_ISSUER is set but WORKFLOWD_JWT_JWKS_URL is not"),
        ({"AUDIENCE": "a"}, "WORKFLOWD_JWT_AUDIENCE is set but WORKFLOWD_JWT_JWKS_URL is not"),
        ({"URL": "http://idp.example/jwks", "ISSUER": "i", "AUDIENCE": "a"}, "is not an https:// URL"),
        ({"URL": "idp.example/jwks", "ISSUER": "i", "AUDIENCE": "a"}, "is not an https:// URL"),
        ({"URL": "https://[::1/jwks", "ISSUER": "i", "AUDIENCE": "a"}, "is not an https:// URL"),
    ],
)  # fmt: skip
def test_incomplete_jwt_settings_are_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    names = {
        "URL": "WORKFLOWD_JWT_JWKS_URL",
        "ISSUER": "WORKFLOWD_JWT_ISSUER",
        "AUDIENCE": "WORKFLOWD_JWT_AUDIENCE",
    }
    for short, value in variables.items():
        monkeypatch.setenv(names[short], value)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings().jwt_settings()


def test_the_event_relay_is_off_unless_a_broker_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().events_url is None
    monkeypatch.setenv("WORKFLOWD_EVENTS_URL", "amqp://guest:secret@broker:5672/")
    settings = Settings()
    assert settings.events_url is not None
    assert settings.events_exchange == "workflowd.events"
    assert "secret" not in repr(settings)


@pytest.mark.parametrize("url", ["kafka://broker:9092", "broker:5672", "http://broker/"])
def test_an_event_url_that_is_not_amqp_is_refused_saying_what_to_give(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("WORKFLOWD_EVENTS_URL", url)
    with pytest.raises(ValidationError, match=r"amqp://user:password@host:5672/vhost"):
        Settings()
