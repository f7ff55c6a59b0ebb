"""The Kafka settings that aiokafka takes as names (compression, security protocol, SASL mechanism) are
checked at start: a wrong value exits 2 naming the variable and the allowed values, never a secret."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from outbox_relay.cli import app
from relay.config import RelaySettings

SASL_PASSWORD = "sasl-s3cret-pw"
DB_PASSWORD = "db-s3cret-pw"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(__import__("os").environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", f"postgresql://relay:{DB_PASSWORD}@127.0.0.1:1/app")
    yield monkeypatch


def errors_of(**env: str) -> list[str]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ValidationError) as caught:
            RelaySettings()
    return [str(error["msg"]) for error in caught.value.errors()]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("gzip", "gzip"), ("GZIP", "gzip"), ("none", None), ("None", None), ("", None)],
)
def test_compression_names_are_read_case_insensitively(
    environment: pytest.MonkeyPatch, value: str, expected: str | None
) -> None:
    environment.setenv("OUTBOX_KAFKA_COMPRESSION", value)
    assert RelaySettings().kafka_compression == expected


def test_security_protocol_and_mechanism_are_read_case_insensitively(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    environment.setenv("OUTBOX_KAFKA_SASL_MECHANISM", "scram-sha-512")
    environment.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    environment.setenv("OUTBOX_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    settings = RelaySettings()
    assert (settings.kafka_security_protocol, settings.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")


def test_a_codec_that_is_not_installed_is_named_with_its_package() -> None:
    from aiokafka import codec

    missing = [name for name in ("snappy", "lz4", "zstd") if not getattr(codec, f"has_{name}")()]
    if not missing:
        pytest.fail("every codec is installed here: this test needs one that is not")
    (message,) = errors_of(OUTBOX_KAFKA_COMPRESSION=missing[0])
    assert f"OUTBOX_KAFKA_COMPRESSION={missing[0]}" in message
    assert f"aiokafka[{missing[0]}]" in message


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("OUTBOX_KAFKA_COMPRESSION", "brotli", ["'gzip'", "'snappy'", "'lz4'", "'zstd'"]),
        ("OUTBOX_KAFKA_SECURITY_PROTOCOL", "TLS", ["'PLAINTEXT'", "'SSL'", "'SASL_PLAINTEXT'", "'SASL_SSL'"]),
        ("OUTBOX_KAFKA_SASL_MECHANISM", "GSSAPI", ["'PLAIN'", "'SCRAM-SHA-256'", "'SCRAM-SHA-512'"]),
    ],
)
def test_a_wrong_name_exits_2_with_the_variable_and_the_allowed_values(
    environment: pytest.MonkeyPatch, variable: str, value: str, allowed: list[str]
) -> None:
    environment.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    environment.setenv("OUTBOX_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    environment.setenv(variable, value)

    result = CliRunner().invoke(app, ["run"])

    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if variable in line)
    assert all(name in line for name in allowed), line
    assert repr(value.upper() if "COMPRESSION" not in variable else value.lower()) in line
    assert SASL_PASSWORD not in result.output and DB_PASSWORD not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "OUTBOX_KAFKA_SASL_MECHANISM is required with OUTBOX_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        (
            {"OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN"},
            "OUTBOX_KAFKA_SASL_MECHANISM=PLAIN needs OUTBOX_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL",
        ),
        (
            {"OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN"},
            "needs OUTBOX_KAFKA_SASL_USERNAME and OUTBOX_KAFKA_SASL_PASSWORD",
        ),
    ],
)
def test_sasl_settings_that_cannot_work_together_are_refused(env: dict[str, str], expected: str) -> None:
    (message,) = errors_of(**env)
    assert expected in message


def test_the_sasl_check_never_echoes_the_password(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    environment.setenv("OUTBOX_KAFKA_SASL_PASSWORD", SASL_PASSWORD)  # but no mechanism, no user
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2, result.output
    assert "OUTBOX_KAFKA_SASL_MECHANISM is required" in result.output
    assert SASL_PASSWORD not in result.output and DB_PASSWORD not in result.output
