"""Configuration without a database: docs/configuration.md lists every setting (relay, control plane and
outboxctl client) with its real default, OUTBOX_* variables parse (or fail clearly), routes pick sinks,
and URLs are redacted."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings
from typer.testing import CliRunner

from clients.control import DEFAULT_ADDR, DEFAULT_TIMEOUT, ControlConfig
from control.server import ControlSettings
from outbox_relay.cli import app
from relay.config import DatabaseSettings, RelaySettings, SettleMode, SinkKind
from relay.shared.redaction import redact
from relay.shared.secret_files import SECRETS_DIR_VARIABLE, secret_variables
from relay.sinks.router import Route, Router, parse_routes

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
# Variables the docs may name that are not settings fields (CLI options read from the environment, and
# where secrets may come from: relay.shared.secret_files). OUTBOX_INBOX_MAX_ATTEMPTS is read by the
# consuming services' inbox (clients.inbox), not by a command; tests/integration/test_inbox.py checks
# its documented default.
NON_FIELD_VARIABLES = {"OUTBOX_LOG_LEVEL", SECRETS_DIR_VARIABLE, "OUTBOX_INBOX_MAX_ATTEMPTS"}
# The server-side settings, each with the command whose default the docs must give for it.
SETTINGS_CLASSES: list[tuple[type[BaseSettings], str]] = [
    (DatabaseSettings, "migrate"),
    (RelaySettings, "run"),
    (ControlSettings, "control"),
]
# The table of the outboxctl client's variables (clients.control.ControlConfig.resolve), a separate
# namespace: OUTBOX_CONTROL_ADDR also names a server setting there.
CLIENT_SECTION = "Client (`outboxctl`)"
# How each documented outboxctl variable shows in ControlConfig.resolve(env=...): proof it is read.
CLIENT_VARIABLES: dict[str, tuple[dict[str, str], Callable[[ControlConfig], bool]]] = {
    "OUTBOX_CONTROL_ADDR": ({"OUTBOX_CONTROL_ADDR": "relay:1"}, lambda c: c.addr == "relay:1"),
    "OUTBOX_CONTROL_TOKEN": ({"OUTBOX_CONTROL_TOKEN": "t0ken"}, lambda c: c.token is not None),
    "OUTBOX_CONTROL_TOKEN_FILE": (
        {"OUTBOX_CONTROL_TOKEN_FILE": "{token_file}"},
        lambda c: c.token is not None,
    ),
    "OUTBOX_CONTROL_TLS": ({"OUTBOX_CONTROL_TLS": "true"}, lambda c: c.tls),
    "OUTBOX_CONTROL_TLS_CA": (
        {"OUTBOX_CONTROL_TLS_CA": "ca.pem"},
        lambda c: c.tls and c.tls_ca == Path("ca.pem"),
    ),
    "OUTBOX_CONTROL_CLIENT_CERT": (
        {"OUTBOX_CONTROL_CLIENT_CERT": "c.pem", "OUTBOX_CONTROL_CLIENT_KEY": "k.pem"},
        lambda c: c.tls and c.tls_cert == Path("c.pem"),
    ),
    "OUTBOX_CONTROL_CLIENT_KEY": (
        {"OUTBOX_CONTROL_CLIENT_CERT": "c.pem", "OUTBOX_CONTROL_CLIENT_KEY": "k.pem"},
        lambda c: c.tls and c.tls_key == Path("k.pem"),
    ),
    "OUTBOX_CONTROL_TLS_SERVER_NAME": (
        {"OUTBOX_CONTROL_TLS_SERVER_NAME": "relay.example"},
        lambda c: c.tls_server_name == "relay.example",
    ),
    "OUTBOX_CONTROL_TIMEOUT": ({"OUTBOX_CONTROL_TIMEOUT": "2.5"}, lambda c: c.timeout == 2.5),
    "OUTBOX_CONTROL_OPERATOR": ({"OUTBOX_CONTROL_OPERATOR": "alice"}, lambda c: c.operator == "alice"),
}
_ROW = re.compile(r"^\|\s*`(OUTBOX_[A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", re.MULTILINE)
_HEADING = re.compile(r"^#{2,3} (.+)$", re.MULTILINE)


def env_name(settings_class: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """`OUTBOX_<NAME>` for the relay, `OUTBOX_CONTROL_<NAME>` for the control plane, unless aliased."""
    return field.alias or f"{settings_class.model_config.get('env_prefix', '')}{name.upper()}"


def known_variables() -> set[str]:
    return {
        env_name(settings_class, name, field)
        for settings_class, _ in SETTINGS_CLASSES
        for name, field in settings_class.model_fields.items()
    }


def sections() -> dict[str, str]:
    """Heading (## or ###) -> the text up to the next such heading, of docs/configuration.md."""
    text = DOCS.read_text(encoding="utf-8")
    headings = list(_HEADING.finditer(text))
    return {
        heading[1].strip(): text[heading.end() : following.start() if following else len(text)]
        for heading, following in zip(headings, [*headings[1:], None], strict=True)
    }


def table_rows(client: bool) -> list[tuple[str, str]]:
    """(variable, default cell) of every table row: of the outboxctl client's table, or of all others."""
    return [
        row
        for heading, body in sections().items()
        if (heading == CLIENT_SECTION) == client
        for row in _ROW.findall(body)
    ]


def documented_defaults() -> dict[str, str]:
    """Variable -> the default cell of its row in a server-side table of docs/configuration.md."""
    return dict(table_rows(client=False))


def default_for(cell: str, command: str) -> str:
    """The default a cell gives for `command`. A variable read by two commands with two defaults has
    a cell like "`127.0.0.1:50051` for `control`; unset for `run`"; a plain cell applies to all."""
    defaults = {}
    for part in cell.split(";"):
        value, _, commands = part.strip().partition(" for ")
        defaults[commands.strip("` ")] = value.strip()
    return defaults.get(command, defaults.get("", ""))


def documented_default(value: object) -> str:
    """How docs/configuration.md writes a default value."""
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, Enum):
        text = str(value.value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"`{text}`"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.upper().startswith("OUTBOX_") or name == "POD_NAME":
            monkeypatch.delenv(name)
    yield monkeypatch


# --- docs/configuration.md -------------------------------------------------------------------------


@pytest.mark.parametrize("settings_class", [cls for cls, _ in SETTINGS_CLASSES])
def test_every_setting_has_a_row_in_the_configuration_docs(settings_class: type[BaseSettings]) -> None:
    documented = documented_defaults()
    missing = [
        env_name(settings_class, name, field)
        for name, field in settings_class.model_fields.items()
        if env_name(settings_class, name, field) not in documented
    ]
    assert not missing, f"docs/configuration.md has no table row for {missing}"


@pytest.mark.parametrize(("settings_class", "command"), SETTINGS_CLASSES)
def test_documented_defaults_are_the_real_ones(settings_class: type[BaseSettings], command: str) -> None:
    documented = documented_defaults()
    wrong = {}
    for name, field in settings_class.model_fields.items():
        if field.default is PydanticUndefined:  # computed (default_factory): described in words
            continue
        variable = env_name(settings_class, name, field)
        shown = default_for(documented.get(variable, ""), command)
        expected = documented_default(field.default)
        if shown != expected:
            wrong[variable] = (shown, expected)
    assert not wrong, f"documented vs real defaults for `{command}`: {wrong}"


def test_control_addr_is_one_variable_for_run_and_control() -> None:
    assert env_name(RelaySettings, "control_addr", RelaySettings.model_fields["control_addr"]) == (
        env_name(ControlSettings, "addr", ControlSettings.model_fields["addr"])
    )


def secret_file_variables() -> set[str]:
    """`<VAR>_FILE` of every secret setting (relay.shared.secret_files; the tokens' are fields)."""
    return {f"{v}_FILE" for settings_class, _ in SETTINGS_CLASSES for v in secret_variables(settings_class).values()}


def test_the_docs_name_no_variable_that_does_not_exist() -> None:
    named = set(re.findall(r"\bOUTBOX_[A-Z0-9_]*[A-Z0-9]\b", DOCS.read_text(encoding="utf-8")))
    unknown = named - known_variables() - NON_FIELD_VARIABLES - set(CLIENT_VARIABLES) - secret_file_variables()
    assert unknown == set()


def test_the_docs_name_every_secret_file_variable() -> None:
    named = set(re.findall(r"\bOUTBOX_[A-Z0-9_]*[A-Z0-9]\b", DOCS.read_text(encoding="utf-8")))
    expected = {"OUTBOX_DATABASE_URL_FILE", "OUTBOX_REDIS_URL_FILE", "OUTBOX_KAFKA_SASL_PASSWORD_FILE"}
    assert expected <= secret_file_variables()
    assert secret_file_variables() - named == set()
    assert SECRETS_DIR_VARIABLE in named


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_every_variable_has_exactly_one_row(client: bool) -> None:
    variables = [variable for variable, _ in table_rows(client)]
    assert variables, "no table rows found: did a heading change?"
    assert len(variables) == len(set(variables)), sorted(v for v in variables if variables.count(v) > 1)


def test_the_client_table_lists_the_variables_outboxctl_reads() -> None:
    rows = dict(table_rows(client=True))
    assert set(rows) == set(CLIENT_VARIABLES)
    assert rows["OUTBOX_CONTROL_ADDR"] == documented_default(DEFAULT_ADDR)
    assert rows["OUTBOX_CONTROL_TIMEOUT"] == documented_default(DEFAULT_TIMEOUT)
    assert rows["OUTBOX_CONTROL_TLS"] == documented_default(False)


@pytest.mark.parametrize("variable", sorted(CLIENT_VARIABLES))
def test_each_client_variable_is_read(variable: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n", encoding="utf-8")
    env, check = CLIENT_VARIABLES[variable]
    env = {name: value.format(token_file=token_file) for name, value in env.items()}
    assert not check(ControlConfig.resolve(env={}))
    assert check(ControlConfig.resolve(env=env))


def test_the_client_ignores_the_server_certificate_variables() -> None:
    server_env = {"OUTBOX_CONTROL_TLS_CERT": "server.pem", "OUTBOX_CONTROL_TLS_KEY": "server.key"}
    config = ControlConfig.resolve(env=server_env)
    assert (config.tls, config.tls_cert, config.tls_key) == (False, None, None)


# --- parsing -----------------------------------------------------------------------------------------


def test_defaults_without_any_environment() -> None:
    settings = RelaySettings()
    assert settings.schema_name == "outbox"
    assert settings.database_url.get_secret_value() == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert settings.default_sink is SinkKind.KAFKA
    assert settings.settle_mode is SettleMode.DELETE
    assert settings.redis_shards == {}
    assert settings.kafka_bootstrap is None


def test_variables_are_read_with_the_outbox_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://relay:pw@db:5432/app")
    monkeypatch.setenv("OUTBOX_SCHEMA", "events")
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "250")
    monkeypatch.setenv("OUTBOX_LEASE_TTL", "7.5")
    monkeypatch.setenv("OUTBOX_LISTEN", "false")
    monkeypatch.setenv("OUTBOX_DEFAULT_SINK", "redis")
    monkeypatch.setenv("OUTBOX_SETTLE_MODE", "retain")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORD", "kafka-secret")

    settings = RelaySettings()

    assert settings.database_url.get_secret_value() == "postgresql://relay:pw@db:5432/app"
    assert settings.schema_name == "events"
    assert settings.batch_size == 250
    assert settings.lease_ttl == 7.5
    assert settings.listen is False
    assert settings.default_sink is SinkKind.REDIS
    assert settings.settle_mode is SettleMode.RETAIN
    assert settings.kafka_sasl_password is not None
    assert "kafka-secret" not in repr(settings) and "pw@" not in repr(settings)
    assert DatabaseSettings().schema_name == "events"


def test_redis_shards_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_REDIS_SHARDS", "orders=16")
    assert RelaySettings().redis_shards == {"orders": 16}

    monkeypatch.setenv("OUTBOX_REDIS_SHARDS", " orders=16 , notify.email=4,")
    assert RelaySettings().redis_shards == {"orders": 16, "notify.email": 4}

    monkeypatch.setenv("OUTBOX_REDIS_SHARDS", "")
    assert RelaySettings().redis_shards == {}


@pytest.mark.parametrize("value", ["orders", "orders=0", "orders=x", "orders=-2", "orders=1.5"])
def test_bad_redis_shards_name_the_item(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OUTBOX_REDIS_SHARDS", value)
    with pytest.raises(ValidationError) as caught:
        RelaySettings()
    message = str(caught.value)
    assert "redis_shards" in message
    assert "must be topic=N with N >= 1" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("OUTBOX_BATCH_SIZE", "0", "batch_size"),
        ("OUTBOX_BATCH_SIZE", "10001", "batch_size"),
        ("OUTBOX_BATCH_SIZE", "many", "batch_size"),
        ("OUTBOX_LEASE_TTL", "0.5", "lease_ttl"),
        ("OUTBOX_POOL_SIZE", "1", "pool_size"),
        ("OUTBOX_PARTITIONS", "5000", "partitions"),
        ("OUTBOX_LISTEN", "maybe", "listen"),
        ("OUTBOX_DEFAULT_SINK", "rabbitmq", "default_sink"),
        ("OUTBOX_SETTLE_MODE", "archive", "settle_mode"),
        ("OUTBOX_BACKOFF_MULTIPLIER", "0.5", "backoff_multiplier"),
    ],
)
def test_bad_values_name_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        RelaySettings()
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]


@pytest.mark.parametrize("value", ["Outbox", "my-schema", "1outbox", 'x"; DROP TABLE y; --', "a" * 64])
def test_a_bad_schema_name_is_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", value)
    with pytest.raises(ValidationError, match="lower-case SQL identifier"):
        DatabaseSettings()


def test_instance_id_defaults_to_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "relay-7f9c-abcde")
    assert RelaySettings().instance_id == "relay-7f9c-abcde"


def test_an_explicit_instance_id_beats_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "relay-7f9c-abcde")
    monkeypatch.setenv("OUTBOX_INSTANCE_ID", "relay-a")
    assert RelaySettings().instance_id == "relay-a"


def test_instance_id_without_pod_name_is_host_and_pid() -> None:
    assert RelaySettings().instance_id == f"{socket.gethostname()}:{os.getpid()}"


def test_the_cli_reports_bad_configuration_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://u:s3cr3tpw@127.0.0.1:1/db")
    monkeypatch.setenv("OUTBOX_REDIS_SHARDS", "orders=0")

    result = CliRunner().invoke(app, ["run"])

    assert result.exit_code == 2
    output = result.output
    assert "error: invalid configuration" in output
    assert "OUTBOX_REDIS_SHARDS item 'orders=0'" in output
    assert "s3cr3tpw" not in output
    assert "Traceback" not in output


def test_migrate_reads_only_the_database_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", "Bad-Schema")
    result = CliRunner().invoke(app, ["migrate", "--sql"])
    assert result.exit_code == 2
    assert "lower-case SQL identifier" in result.output

    monkeypatch.setenv("OUTBOX_SCHEMA", "good_schema")
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "0")  # not a migrate setting: ignored
    result = CliRunner().invoke(app, ["migrate", "--sql"])
    assert result.exit_code == 0, result.output
    assert 'CREATE TABLE "good_schema".outbox' in result.output


# --- routing -----------------------------------------------------------------------------------------


def test_parse_routes_keeps_order_and_normalises() -> None:
    assert parse_routes(" orders.*=kafka , notify.*= REDIS ,, ") == [
        Route("orders.*", SinkKind.KAFKA),
        Route("notify.*", SinkKind.REDIS),
    ]
    assert parse_routes("") == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("orders.*", "must look like pattern=sink"),
        ("=kafka", "must look like pattern=sink"),
        ("  =redis", "must look like pattern=sink"),
        ("orders.*=rabbitmq", "sink must be one of kafka, redis"),
        ("orders.*=", "sink must be one of kafka, redis"),
        ("orders.*=kafka,notify.*", "'notify.*'"),
    ],
)
def test_bad_route_specs_raise_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        parse_routes(spec)
    assert "OUTBOX_ROUTES" in str(caught.value)


def test_first_matching_route_wins() -> None:
    router = Router(parse_routes("orders.refunds=redis,orders.*=kafka,*.email=redis"), SinkKind.KAFKA, {})
    assert router.sink_kind_for("orders.refunds") is SinkKind.REDIS
    assert router.sink_kind_for("orders.created") is SinkKind.KAFKA
    assert router.sink_kind_for("orders.email") is SinkKind.KAFKA  # orders.* comes first
    assert router.sink_kind_for("notify.email") is SinkKind.REDIS


def test_unmatched_topics_go_to_the_default_sink() -> None:
    router = Router(parse_routes("notify.*=redis"), SinkKind.KAFKA, {})
    assert router.sink_kind_for("orders.created") is SinkKind.KAFKA
    assert router.sink_kind_for("notify") is SinkKind.KAFKA  # "notify.*" needs the dot
    assert router.sink_kind_for("Notify.email") is SinkKind.KAFKA  # patterns are case-sensitive
    assert Router([], SinkKind.REDIS, {}).sink_kind_for("anything") is SinkKind.REDIS


def test_patterns_are_shell_style() -> None:
    router = Router(parse_routes("audit.?=redis,billing.[ab]*=redis"), SinkKind.KAFKA, {})
    assert router.sink_kind_for("audit.1") is SinkKind.REDIS
    assert router.sink_kind_for("audit.12") is SinkKind.KAFKA
    assert router.sink_kind_for("billing.any") is SinkKind.REDIS
    assert router.sink_kind_for("billing.zz") is SinkKind.KAFKA


def test_needed_sinks_are_the_default_and_the_routed_ones() -> None:
    settings = RelaySettings(routes="notify.*=redis")
    assert Router.needed_sinks(settings) == {SinkKind.KAFKA, SinkKind.REDIS}
    assert Router.needed_sinks(RelaySettings()) == {SinkKind.KAFKA}
    assert Router.needed_sinks(RelaySettings(default_sink=SinkKind.REDIS)) == {SinkKind.REDIS}


# --- redaction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://relay:s3cr3t@db:5432/app", "postgresql://relay:***@db:5432/app"),
        ("postgresql+psycopg://relay:s3cr3t@db/app", "postgresql+psycopg://relay:***@db/app"),
        ("POSTGRES://Relay:S3cr3t@db/app", "POSTGRES://Relay:***@db/app"),
        ("redis://:s3cr3t@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://relay:p%40ss%3Aw0rd@db/app", "postgresql://relay:***@db/app"),
        ("postgresql://relay:a:b:c@db/app", "postgresql://relay:***@db/app"),
        (
            "failed: postgresql://a:one@h1/db then redis://b:two@h2/0.",
            "failed: postgresql://a:***@h1/db then redis://b:***@h2/0.",
        ),
    ],
)
def test_redact_hides_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://relay@db:5432/app",
        "postgresql://db:5432/app",
        "kafka-0:9092,kafka-1:9092",
        "no url here: user:password@host",
        "",
    ],
)
def test_redact_leaves_text_without_a_password_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    once = redact("postgresql://relay:s3cr3t@db/app")
    assert redact(once) == once


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", "")
    monkeypatch.setenv("OUTBOX_REDIS_MAXLEN", "")
    monkeypatch.setenv("OUTBOX_KAFKA_COMPRESSION", "")
    settings = RelaySettings()
    assert (settings.schema_name, settings.redis_maxlen, settings.kafka_compression) == ("outbox", None, None)
