"""relay.shared.redaction.redact and relay.shared.config_errors: no secret in a message, a configuration error names the
variable and never a secret value (issue 13)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from control.server import ControlSettings
from relay.config import DatabaseSettings, RelaySettings
from relay.shared.config_errors import config_error_lines
from relay.shared.environment_secrets import remember_environment_secrets
from relay.shared.redaction import forget_secrets, redact, remember_secret


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # URLs: PostgreSQL, Redis with and without a user, TLS Redis
        ("postgresql://app:pw-1@db/app", "postgresql://app:***@db/app"),
        ("redis://:pw-2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://user:pw-3@cache:6380", "rediss://user:***@cache:6380"),
        # query parameters
        ("postgresql://app@db/app?password=pw-4", "postgresql://app@db/app?password=***"),
        ("postgresql://app@db/app?sslmode=require&sslpassword=pw-5&x=1", "postgresql://app@db/app?sslmode=require&sslpassword=***&x=1"),
        # keyword DSNs, unquoted and quoted with spaces, and spaces around '='
        ("host=db user=app password=pw-6 dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password='p w 7' user=app", "host=db password='***' user=app"),
        (r"host=db password='it\'s 8' user=app", "host=db password='***' user=app"),
        ("host=db password = pw-9", "host=db password = ***"),
        ("sslpassword=pw-10", "sslpassword=***"),
        # environment-style assignments
        ("PGPASSWORD=pw-11 psql", "PGPASSWORD=*** psql"),
        ("OUTBOX_KAFKA_SASL_PASSWORD=pw-12", "OUTBOX_KAFKA_SASL_PASSWORD=***"),
        ("OUTBOX_CONTROL_ADMIN_TOKEN=tok-13", "OUTBOX_CONTROL_ADMIN_TOKEN=***"),
        # dict reprs and JSON
        ("{'read_token': 'tok-14', 'addr': 'x'}", "{'read_token': '***', 'addr': 'x'}"),
        ('{"password": "pw-15"}', '{"password": "***"}'),
    ],
)
def test_redact_hides_every_form_of_password(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "OUTBOX_CONTROL_READ_TOKEN: must differ from the admin token",
        "no url here: user:password@host",
        "Tokens(read=set, admin=set)",
        "released lease (fencing token 7)",
        "postgresql://app@db/app?sslmode=require",
    ],
)
def test_redact_leaves_messages_about_secrets_alone(text: str) -> None:
    assert redact(text) == text


def test_remembered_secrets_are_redacted_anywhere() -> None:
    remember_secret("tok-remembered-1")
    remember_secret(b"tok-remembered-2")
    remember_secret("short")  # too short to hide without mangling messages
    remember_secret("postgres")  # public words are never hidden either
    text = "got tok-remembered-1 and tok-remembered-2 from short postgres"
    assert redact(text) == "got *** and *** from short postgres"


def test_the_environment_is_remembered_before_parsing(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-abc123\n")
    remember_environment_secrets({
        "OUTBOX_CONTROL_ADMIN_TOKEN": "admin-token-abc123",
        "OUTBOX_CONTROL_READ_TOKEN_FILE": str(token_file),
        "OUTBOX_DATABASE_URL": "postgresql://app:db-pw-abc123@db/app",
        "OUTBOX_REDIS_URL": "host=db password='kw pw abc123'",
        "PGPASSWORD": "pg-pw-abc123",
        "HOME_TOKEN": "not-ours-abc123",
    })
    text = "admin-token-abc123 file-token-abc123 db-pw-abc123 kw pw abc123 pg-pw-abc123 not-ours-abc123"
    assert redact(text) == "*** *** *** *** *** not-ours-abc123"


# --- configuration errors ---------------------------------------------------------------------------


def _lines(kind: type[DatabaseSettings] | type[ControlSettings]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        kind()
    return config_error_lines(caught.value, kind)


def test_a_field_error_names_the_variable_and_shows_a_harmless_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "0")
    assert _lines(RelaySettings) == ["OUTBOX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"]


def test_an_alias_is_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", "Bad")
    [line] = _lines(DatabaseSettings)
    assert line.startswith("OUTBOX_SCHEMA: schema name 'Bad' must be")


@pytest.mark.parametrize(
    "url",
    [
        "host=db user=app password=secret-pw-1",
        "host=db user=app password='secret pw 1'",
        "postgresql://app:secret-pw-1/db/app",  # no '@': the password would be read as the port
        "app:secret-pw-1@db/app",
    ],
)
def test_a_bad_database_url_is_named_never_shown(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", url)
    [line] = _lines(DatabaseSettings)
    assert line.startswith("OUTBOX_DATABASE_URL: ")
    assert "secret" not in line and "pw 1" not in line


def test_a_secret_field_value_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORD", "x")  # valid; then break a model check
    monkeypatch.setenv("OUTBOX_CONTROL_READ_TOKEN", "same-token-123456")
    monkeypatch.setenv("OUTBOX_CONTROL_ADMIN_TOKEN", "same-token-123456")
    lines = _lines(ControlSettings)
    assert lines == ["OUTBOX_CONTROL_READ_TOKEN: must differ from the admin token"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OUTBOX_CONTROL_READ_TOKEN": "t-1234567", "OUTBOX_CONTROL_READ_TOKEN_FILE": "/x"}, "OUTBOX_CONTROL_READ_TOKEN:"),
        ({"OUTBOX_CONTROL_ADMIN_TOKEN_FILE": "/nonexistent/t"}, "OUTBOX_CONTROL_ADMIN_TOKEN_FILE: cannot read"),
        ({"OUTBOX_CONTROL_TLS_CERT": "/c.pem"}, "OUTBOX_CONTROL_TLS_KEY: is not set"),
        ({"OUTBOX_CONTROL_TLS_KEY": "/k.pem"}, "OUTBOX_CONTROL_TLS_CERT: is not set"),
        ({"OUTBOX_CONTROL_TLS_CLIENT_CA": "/ca.pem"}, "OUTBOX_CONTROL_TLS_CLIENT_CA: needs"),
    ],
)
def test_control_settings_errors_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    [line] = _lines(ControlSettings)
    assert line.startswith(expected)
    assert "t-1234567" not in line


def test_every_problem_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "many")
    monkeypatch.setenv("OUTBOX_LISTEN", "maybe")
    monkeypatch.setenv("OUTBOX_ROUTES", "orders.*=rabbitmq")
    lines = _lines(RelaySettings)
    assert [re.split("[ :]", line, maxsplit=1)[0] for line in lines] == [
        "OUTBOX_ROUTES", "OUTBOX_BATCH_SIZE", "OUTBOX_LISTEN"
    ]
    assert all("\n" not in line for line in lines)
