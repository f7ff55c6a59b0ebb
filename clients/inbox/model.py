"""What the inbox takes and gives: the message, the outcome of processing it, the settings, and the
checks that give a bad input a clear error before the database is touched."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "InboxError",
    "InboxMessage",
    "InboxOutcome",
    "InboxResult",
    "InboxSettings",
    "InboxValidationError",
]

MAX_NAME_LENGTH = 200  # consumer, message_id and worker id: the table's CHECK constraints
MAX_ERROR_LENGTH = 4000  # the handler's error text kept in last_error
DEFAULT_LOCK_STALE_THRESHOLD = 300.0
DEFAULT_MAX_ATTEMPTS = 5
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # as relay.shared.identifiers.validate_schema_name
# Printable, no whitespace at either end: a consumer name shows up in logs, metrics and queries.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InboxError(Exception):
    """Base of the inbox's own errors."""


class InboxValidationError(InboxError, ValueError):
    """A message, consumer name or setting the inbox cannot use; nothing was sent to the database."""


@dataclass(frozen=True)
class InboxMessage:
    """One delivered message, as a consumer hands it to the inbox."""

    message_id: str  # the relay's stable message-id header
    topic: str  # logical topic (Kafka topic, or the Redis stream without its ':N' shard suffix)
    key: str | None
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""  # where it came from, for logs: "kafka:orders[3]@1234", "redis:orders:2/1700000000000-0"


class InboxOutcome(StrEnum):
    PROCESSED = "processed"  # handler ran and committed together with the processed mark
    DUPLICATE = "duplicate"  # already processed: skipped (the idempotent hit)
    LOCKED = "locked"  # another worker holds a lock younger than the stale threshold: skipped
    FAILED = "failed"  # handler raised; lock released, error + attempt recorded; may be retried
    GAVE_UP = "gave_up"  # attempts reached max_attempts: status 'failed', not retried


@dataclass(frozen=True)
class InboxResult:
    outcome: InboxOutcome
    attempts: int
    error: str | None = None  # the handler's error text for FAILED/GAVE_UP
    previous_holder: str | None = None  # set when a stale lock was taken over
    holder: str | None = None  # LOCKED: the worker holding the lock


@dataclass(frozen=True)
class InboxSettings:
    consumer: str
    schema: str
    lock_stale_threshold: float
    max_attempts: int
    worker_id: str

    @classmethod
    def resolve(
        cls,
        consumer: object,
        *,
        schema: object,
        lock_stale_threshold: object,
        max_attempts: object,
        worker_id: object,
    ) -> InboxSettings:
        """The settings, each from the argument, else its environment variable, else the default."""
        return cls(
            consumer=check_name("consumer", consumer),
            schema=_check_schema(schema),
            lock_stale_threshold=_seconds(
                "lock_stale_threshold", lock_stale_threshold, "OUTBOX_INBOX_LOCK_STALE_THRESHOLD",
                DEFAULT_LOCK_STALE_THRESHOLD,
            ),
            max_attempts=_attempts(max_attempts),
            worker_id=check_name("worker_id", default_worker_id() if worker_id is None else worker_id),
        )


def default_worker_id() -> str:
    """POD_NAME (Kubernetes), else hostname:pid."""
    pod = os.environ.get("POD_NAME", "").strip()
    return pod or f"{socket.gethostname()}:{os.getpid()}"


def check_name(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InboxValidationError(f"{what} must be a str, got {type(value).__name__}")
    if not value or len(value) > MAX_NAME_LENGTH:
        raise InboxValidationError(f"{what} must be 1..{MAX_NAME_LENGTH} characters, got {len(value)}: {value[:60]!r}")
    if value != value.strip() or _CONTROL.search(value):
        raise InboxValidationError(
            f"{what} must not contain control characters nor start or end with whitespace: {value!r}"
        )
    return value


def check_message(message: object) -> InboxMessage:
    if not isinstance(message, InboxMessage):
        raise InboxValidationError(f"message must be an InboxMessage, got {type(message).__name__}")
    if message.message_id is None or message.message_id == "":
        where = f" from {message.source}" if message.source else ""
        raise InboxValidationError(
            f"message{where} (topic {message.topic!r}) has no message_id: the inbox cannot tell a "
            "redelivery from a new message without the relay's message-id header"
        )
    check_name("message_id", message.message_id)
    if not isinstance(message.topic, str) or "\x00" in message.topic:
        raise InboxValidationError(f"topic must be a str without NUL characters: {message.topic!r}")
    if message.key is not None and (not isinstance(message.key, str) or "\x00" in message.key):
        raise InboxValidationError(f"key must be None or a str without NUL characters: {message.key!r}")
    return message


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 3] + "..."


def _check_schema(schema: object) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise InboxValidationError(f"schema must be a lower-case SQL identifier ([a-z_][a-z0-9_]*): {schema!r}")
    return schema


def _seconds(what: str, value: object, variable: str, default: float) -> float:
    if value is None:
        raw = os.environ.get(variable, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise InboxValidationError(f"{variable} must be a number of seconds, got {raw!r}") from None
        what = variable
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise InboxValidationError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _attempts(value: object) -> int:
    what = "max_attempts"
    if value is None:
        raw = os.environ.get("OUTBOX_INBOX_MAX_ATTEMPTS", "").strip()
        if not raw:
            return DEFAULT_MAX_ATTEMPTS
        what = "OUTBOX_INBOX_MAX_ATTEMPTS"
        try:
            value = int(raw)
        except ValueError:
            raise InboxValidationError(f"{what} must be a whole number, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise InboxValidationError(f"{what} must be a whole number in [1, 1000000], got {value!r}")
    return value
