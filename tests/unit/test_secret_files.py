"""Secrets from files without a server: `<VAR>_FILE`, OUTBOX_SECRETS_DIR, their errors (naming the
variable and the path, never the content), several control tokens per role (rotation) and the audit
identity that tells them apart, and outboxctl's token file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from clients.control import ControlConfig
from clients.control.errors import InvalidArgument
from control.auth import ADMIN, READER, AuthInterceptor, Unauthenticated, client_identity, load_tokens
from control.server import ControlSettings
from relay.config import DatabaseSettings, RelaySettings
from relay.shared.config_errors import config_error_lines
from relay.shared.environment_secrets import remember_environment_secrets
from relay.shared.redaction import forget_secrets, redact

DB_URL = "postgresql://app:pw-from-file-71c2@db:5432/app"
SASL = "sasl-from-file-5d0e"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)
    yield monkeypatch
    forget_secrets()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_file_variable_gives_the_value_without_its_trailing_newline(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("OUTBOX_DATABASE_URL_FILE", write(tmp_path / "url", DB_URL + "\n"))
    assert DatabaseSettings().database_url.get_secret_value() == DB_URL
    clean_environment.setenv("OUTBOX_KAFKA_SASL_PASSWORD_FILE", write(tmp_path / "sasl", " " + SASL + " \r\n"))
    clean_environment.setenv("OUTBOX_REDIS_URL_FILE", write(tmp_path / "redis", "redis://:r-pw-3e81@r:6379/0"))
    clean_environment.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_environment.setenv("OUTBOX_KAFKA_SASL_MECHANISM", "PLAIN")
    clean_environment.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    settings = RelaySettings()
    assert settings.database_url.get_secret_value() == DB_URL
    # Only the newline goes: a password may begin or end with a space.
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == " " + SASL + " "
    assert settings.redis_url is not None and settings.redis_url.get_secret_value().endswith("@r:6379/0")
    # What a file held is redacted from any message from now on.
    assert "r-pw-3e81" not in redact("redis says no to r-pw-3e81") and SASL not in redact(f"x {SASL} y")


def test_a_variable_and_its_file_together_are_an_error_naming_both(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("OUTBOX_DATABASE_URL", DB_URL)
    clean_environment.setenv("OUTBOX_DATABASE_URL_FILE", write(tmp_path / "url", DB_URL))
    with pytest.raises(SettingsError) as raised:
        DatabaseSettings()
    message = str(raised.value)
    assert message == "OUTBOX_DATABASE_URL: set together with OUTBOX_DATABASE_URL_FILE; set one, not both"
    assert "pw-from-file" not in message


@pytest.mark.parametrize("problem", ["missing", "directory", "empty", "binary"])
def test_an_unusable_file_is_one_line_naming_the_variable_and_path(
    problem: str, tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe" + SASL.encode())
    clean_environment.setenv("OUTBOX_KAFKA_SASL_PASSWORD_FILE", str(path))
    with pytest.raises(SettingsError) as raised:
        RelaySettings()
    message = str(raised.value)
    assert message.startswith(f"OUTBOX_KAFKA_SASL_PASSWORD_FILE: {path}") or message.startswith(
        f"OUTBOX_KAFKA_SASL_PASSWORD_FILE: cannot read {path}"
    ), message
    assert "\n" not in message and SASL not in message


def test_the_secrets_directory_fills_what_the_environment_does_not(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "OUTBOX_DATABASE_URL", DB_URL + "\n")
    write(tmp_path / "OUTBOX_CONTROL_ADMIN_TOKEN", "dir-admin-tok-0a1b\n")
    clean_environment.setenv("OUTBOX_SECRETS_DIR", str(tmp_path))
    assert DatabaseSettings().database_url.get_secret_value() == DB_URL
    tokens = ControlSettings().tokens()
    assert tokens.admins == (b"dir-admin-tok-0a1b",)
    # The environment wins over the directory.
    clean_environment.setenv("OUTBOX_DATABASE_URL", "postgresql://other@db/app")
    clean_environment.setenv("OUTBOX_CONTROL_ADMIN_TOKEN", "env-admin-tok-77aa")
    assert DatabaseSettings().database_url.get_secret_value() == "postgresql://other@db/app"
    assert ControlSettings().tokens().admins == (b"env-admin-tok-77aa",)


def test_a_secrets_directory_that_is_not_there_is_an_error(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("OUTBOX_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SettingsError, match="OUTBOX_SECRETS_DIR"):
        DatabaseSettings()


def test_several_tokens_per_role_are_all_accepted_and_told_apart(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv(
        "OUTBOX_CONTROL_ADMIN_TOKEN_FILE", write(tmp_path / "admins", "admin-old-1111\n\n# new:\nadmin-new-2222\n")
    )
    clean_environment.setenv("OUTBOX_CONTROL_ADMIN_TOKENS", "admin-extra-3333")
    clean_environment.setenv("OUTBOX_CONTROL_READ_TOKEN", "read-only-4444")
    tokens = ControlSettings().tokens()
    assert tokens.admins == (b"admin-old-1111", b"admin-new-2222", b"admin-extra-3333")
    assert "1111" not in repr(tokens) and repr(tokens) == "Tokens(read=set, admin=3 set)"
    interceptor = AuthInterceptor(tokens)

    def who(token: str) -> tuple[str, str]:
        principal = interceptor.authenticate([("authorization", f"Bearer {token}")])
        return principal.name, client_identity(principal, None)

    assert who("admin-old-1111") == ("admin", "token:admin#1")
    assert who("admin-new-2222") == ("admin", "token:admin#2")
    assert who("admin-extra-3333") == ("admin", "token:admin#3")
    assert who("read-only-4444") == ("read", "token:read"), "one token for the role: no number"
    with pytest.raises(Unauthenticated):
        who("admin-old-111")


def test_one_token_per_role_keeps_the_plain_identity() -> None:
    from pydantic import SecretStr

    tokens = load_tokens(read=SecretStr("read-tok-aaaa"), admin=SecretStr("admin-tok-bbbb"))
    interceptor = AuthInterceptor(tokens)
    admin = interceptor.authenticate([("authorization", "Bearer admin-tok-bbbb")])
    assert (admin, client_identity(admin, None)) == (ADMIN, "token:admin")
    reader = interceptor.authenticate([("authorization", "Bearer read-tok-aaaa")])
    assert (reader, client_identity(reader, None)) == (READER, "token:read")


@pytest.mark.parametrize(
    "env",
    [
        {"OUTBOX_CONTROL_READ_TOKENS": "x-tok-0001,admin-tok-dup1"},
        {"OUTBOX_CONTROL_ADMIN_TOKENS": "admin-tok-dup1"},
    ],
)
def test_a_token_given_twice_or_for_both_roles_is_an_error(
    env: dict[str, str], clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("OUTBOX_CONTROL_ADMIN_TOKEN", "admin-tok-dup1")
    for name, value in env.items():
        clean_environment.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        ControlSettings()
    lines = config_error_lines(raised.value, ControlSettings)
    assert lines and all(line.startswith("OUTBOX_CONTROL_") for line in lines)
    assert not any("dup1" in line for line in lines)


def test_remembered_before_parsing_each_rotated_token_and_file_url(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    remember_environment_secrets(
        {
            "OUTBOX_CONTROL_ADMIN_TOKENS": "rot-tok-aaaa1,rot-tok-bbbb2",
            "OUTBOX_DATABASE_URL_FILE": write(tmp_path / "url", DB_URL + "\n"),
            "OUTBOX_CONTROL_READ_TOKEN_FILE": write(tmp_path / "reads", "rd-tok-cccc3\nrd-tok-dddd4\n"),
        }
    )
    text = redact("rot-tok-bbbb2 pw-from-file-71c2 rd-tok-dddd4 db:5432")
    assert text.count("rot-tok") == text.count("pw-from") == text.count("rd-tok") == 0
    assert "db:5432" in text, "only the URL's password is a secret"


def test_outboxctl_token_file_variable_and_secrets_directory(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", "ctl-tok-5151\n")
    with pytest.raises(InvalidArgument, match="set together with OUTBOX_CONTROL_TOKEN_FILE") as raised:
        ControlConfig.resolve(env={"OUTBOX_CONTROL_TOKEN": "ctl-tok-5151", "OUTBOX_CONTROL_TOKEN_FILE": token_file})
    assert "5151" not in str(raised.value)
    config = ControlConfig.resolve(env={"OUTBOX_CONTROL_TOKEN_FILE": token_file})
    assert config.token is not None and config.token.reveal() == "ctl-tok-5151"
    write(tmp_path / "OUTBOX_CONTROL_TOKEN", "dir-tok-6262\n")
    config = ControlConfig.resolve(env={"OUTBOX_SECRETS_DIR": str(tmp_path)})
    assert config.token is not None and config.token.reveal() == "dir-tok-6262"
