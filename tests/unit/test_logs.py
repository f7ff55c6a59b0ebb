"""relay.logs: JSON lines (and console lines) that never carry a password, token or secret."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from relay.logs import ConsoleFormatter, JsonFormatter, setup_logging

DB_URL = "postgresql://relay:hunter2pw@db.internal:5432/app"
REDIS_URL = "redis://:redispw77@redis.internal:6379/0"
SECRETS = ("hunter2pw", "redispw77", "s3cr3t-token", "sasl-pw-1")


def record(
    msg: str = "hello",
    args: tuple[Any, ...] = (),
    *,
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc: BaseException | None = None,
) -> logging.LogRecord:
    """A LogRecord as `logging.getLogger("relay.test").log(...)` would make it."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    logger = logging.getLogger("relay.test")
    return logger.makeRecord("relay.test", level, __file__, 1, msg, args, exc_info, extra=extra)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def as_json(formatter: logging.Formatter, rec: logging.LogRecord) -> dict[str, Any]:
    line = formatter.format(rec)
    assert "\n" not in line, "one JSON object per line"
    entry = json.loads(line)
    assert isinstance(entry, dict)
    return entry


def assert_no_secret(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in {text!r}"


# --- JsonFormatter ---------------------------------------------------------------------------------


def test_json_line_has_the_standard_fields_and_the_static_ones() -> None:
    entry = as_json(JsonFormatter({"instance": "relay-0"}), record("relay started", level=logging.WARNING))

    assert entry["msg"] == "relay started"
    assert entry["level"] == "warning"
    assert entry["logger"] == "relay.test"
    assert entry["instance"] == "relay-0"
    assert entry["ts"].endswith("+00:00") and "T" in entry["ts"]


def test_json_redacts_url_passwords_in_the_message_and_its_arguments() -> None:
    formatter = JsonFormatter()

    direct = as_json(formatter, record(f"connecting to {DB_URL}"))
    formatted = as_json(formatter, record("connecting to %s and %s", (DB_URL, REDIS_URL)))

    assert direct["msg"] == "connecting to postgresql://relay:***@db.internal:5432/app"
    assert formatted["msg"] == (
        "connecting to postgresql://relay:***@db.internal:5432/app and redis://:***@redis.internal:6379/0"
    )


def test_json_redacts_url_passwords_in_exceptions() -> None:
    exc = raised(ConnectionError(f"could not connect to {DB_URL}"))

    entry = as_json(JsonFormatter(), record("publish failed", level=logging.ERROR, exc=exc))

    assert "Traceback" in entry["exc"]
    assert "postgresql://relay:***@db.internal:5432/app" in entry["exc"]
    assert_no_secret(json.dumps(entry))


def test_json_masks_extra_fields_named_like_secrets() -> None:
    extra = {
        "password": "hunter2pw",
        "db_password": "hunter2pw",
        "admin_token": "s3cr3t-token",
        "Token": "s3cr3t-token",
        "client_secret": "sasl-pw-1",
        "SECRET_KEY": "sasl-pw-1",
    }

    entry = as_json(JsonFormatter(), record("configured", extra=extra))

    for key in extra:
        assert entry[key] == "***", key
    assert_no_secret(json.dumps(entry))


def test_json_keeps_ordinary_extras_and_redacts_urls_inside_them() -> None:
    extra = {
        "lease": "partition:3",
        "fence": 7,
        "partitions": 16,
        "sinks": ["kafka", "redis"],
        "dsn": DB_URL,
        "targets": [REDIS_URL],
        "settings": {"url": DB_URL, "sasl_password": "sasl-pw-1", "batch_size": 500},
    }

    entry = as_json(JsonFormatter(), record("lease acquired", extra=extra))

    assert entry["lease"] == "partition:3"
    assert entry["fence"] == 7
    assert entry["partitions"] == 16
    assert entry["sinks"] == ["kafka", "redis"]
    assert entry["dsn"] == "postgresql://relay:***@db.internal:5432/app"
    assert entry["targets"] == ["redis://:***@redis.internal:6379/0"]
    assert entry["settings"] == {
        "url": "postgresql://relay:***@db.internal:5432/app",
        "sasl_password": "***",
        "batch_size": 500,
    }


def test_json_serialises_other_values_as_text() -> None:
    class Endpoint:
        def __str__(self) -> str:
            return f"endpoint {DB_URL}"

    entry = as_json(JsonFormatter(), record("x", extra={"endpoint": Endpoint()}))

    assert entry["endpoint"] == "endpoint postgresql://relay:***@db.internal:5432/app"


# --- ConsoleFormatter ------------------------------------------------------------------------------


def test_console_redacts_messages_exceptions_and_extras() -> None:
    exc = raised(RuntimeError(f"redis said no: {REDIS_URL}"))
    rec = record(
        "cannot reach %s",
        (DB_URL,),
        level=logging.ERROR,
        extra={
            "token": "s3cr3t-token",
            "kafka_sasl_password": "sasl-pw-1",
            "url": REDIS_URL,
            "lease": "leader",
        },
        exc=exc,
    )

    line = ConsoleFormatter().format(rec)

    assert "cannot reach postgresql://relay:***@db.internal:5432/app" in line
    assert "redis said no: redis://:***@redis.internal:6379/0" in line
    assert "token=***" in line
    assert "kafka_sasl_password=***" in line
    assert "url=redis://:***@redis.internal:6379/0" in line
    assert "lease=leader" in line
    assert_no_secret(line)


def test_console_line_is_readable() -> None:
    line = ConsoleFormatter().format(record("lease acquired", extra={"lease": "partition:3", "fence": 7}))

    assert "INFO" in line
    assert "relay.test: lease acquired" in line
    assert line.endswith("lease=partition:3 fence=7")


# --- setup_logging ---------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_writes_json_with_the_instance_when_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)

    setup_logging("INFO", instance_id="relay-7")
    logging.getLogger("relay.coordinator").info("lease acquired", extra={"lease": "partition:1", "fence": 3})
    logging.getLogger("relay.coordinator").debug("not at INFO")
    logging.getLogger("relay.store").warning("database at %s is down", DB_URL)

    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["msg"] for e in entries] == [
        "lease acquired",
        "database at postgresql://relay:***@db.internal:5432/app is down",
    ]
    assert all(e["instance"] == "relay-7" for e in entries)
    assert entries[0]["lease"] == "partition:1"
    assert_no_secret(stream.getvalue())


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_writes_console_lines_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)

    setup_logging("INFO")
    logging.getLogger("relay.service").info("relay started via %s", REDIS_URL)

    text = stream.getvalue()
    assert "relay.service: relay started via redis://:***@redis.internal:6379/0" in text
    with pytest.raises(ValueError):
        json.loads(text)


# --- trace context ----------------------------------------------------------------------------------

TRACE_ID, SPAN_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def in_span() -> Any:
    context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.use_span(NonRecordingSpan(context))


def test_a_line_logged_inside_a_span_carries_its_trace_and_span_ids() -> None:
    with in_span():
        entry = json.loads(JsonFormatter().format(record("publishing")))
        line = ConsoleFormatter().format(record("publishing"))
    assert (entry["trace_id"], entry["span_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert "trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7" in line


def test_a_line_logged_outside_any_span_has_no_trace_fields() -> None:
    entry = json.loads(JsonFormatter().format(record("idle")))
    assert "trace_id" not in entry and "span_id" not in entry
    assert "trace_id" not in ConsoleFormatter().format(record("idle"))
