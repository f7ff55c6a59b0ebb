"""From what a broker delivered to the inbox's InboxMessage, and the names of the relay's streams.
Pure functions: no I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from clients.inbox import InboxMessage

MESSAGE_ID_HEADER = "message-id"  # relay.sinks.base.MESSAGE_ID_HEADER
_SHARD_SUFFIX = re.compile(r":\d+$")


class InvalidMessageError(ValueError):
    """A delivered message the inbox cannot take (no message-id): parked, never processed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # short, a metric label and the dead-letter reason


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def kafka_message(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> InboxMessage:
    """A Kafka record as an InboxMessage; InvalidMessageError when it has no message-id header."""
    decoded = {name: _text(raw) or "" for name, raw in headers}
    source = f"kafka:{topic}[{partition}]@{offset}"
    message_id = decoded.pop(MESSAGE_ID_HEADER, "").strip()
    if not message_id:
        raise InvalidMessageError(
            "missing_message_id",
            f"{source} has no '{MESSAGE_ID_HEADER}' header: it was not published by the relay, the inbox"
            " cannot tell a redelivery of it from a new message",
        )
    return InboxMessage(
        message_id=message_id,
        topic=topic,
        key=_text(key),
        payload=value or b"",
        headers=MappingProxyType(decoded),
        source=source,
    )


def redis_message(stream: str, entry_id: bytes | str, fields: Mapping[Any, Any]) -> InboxMessage:
    """A stream entry written by the relay (message-id, payload, headers as JSON, key, traceparent)
    as an InboxMessage; InvalidMessageError when it has no message-id field."""
    by_name = {_text(name) or "": raw for name, raw in fields.items()}
    source = f"redis:{stream}/{_text(entry_id)}"
    message_id = (_text(by_name.get(MESSAGE_ID_HEADER)) or "").strip()
    if not message_id:
        raise InvalidMessageError(
            "missing_message_id",
            f"{source} has no '{MESSAGE_ID_HEADER}' field: it was not published by the relay, the inbox"
            " cannot tell a redelivery of it from a new message",
        )
    headers: dict[str, str] = {}
    raw_headers = _text(by_name.get("headers"))
    if raw_headers:
        try:
            decoded = json.loads(raw_headers)
        except ValueError:
            decoded = {}
        if isinstance(decoded, dict):
            headers = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in decoded.items()}
    traceparent = _text(by_name.get("traceparent"))
    if traceparent:
        headers["traceparent"] = traceparent
    payload = by_name.get("payload", b"")
    return InboxMessage(
        message_id=message_id,
        topic=logical_topic(stream),
        key=_text(by_name.get("key")),
        payload=payload if isinstance(payload, bytes) else str(payload).encode(),
        headers=MappingProxyType(headers),
        source=source,
    )


def logical_topic(stream: str) -> str:
    """The relay's topic of a stream: 'orders:3' (shard 3 of orders) -> 'orders'."""
    return _SHARD_SUFFIX.sub("", stream)


def shard_streams(topics: Iterable[str], shards: int) -> list[str]:
    """The streams to consume: each topic itself, or with `shards` > 0 its shards 'topic:0' ...
    'topic:N-1' (as the relay names them with OUTBOX_REDIS_SHARDS=topic=N)."""
    streams: list[str] = []
    for topic in topics:
        streams.extend([f"{topic}:{n}" for n in range(shards)] if shards > 0 else [topic])
    return streams


def split_names(value: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [name.strip() for name in value.split(",") if name.strip()]


def kafka_subscription(value: str) -> tuple[list[str], str | None]:
    """--kafka 'orders,payments' -> topics; 'orders.*' (shell-style, like OUTBOX_ROUTES) -> a regex
    pattern matching whole topic names."""
    import fnmatch

    names = split_names(value)
    if not names:
        raise ValueError("--kafka needs a topic, a comma-separated list of topics, or a pattern such as 'orders.*'")
    if any(ch in name for name in names for ch in "*?["):
        return [], "|".join(f"(?:{fnmatch.translate(name)})" for name in names)
    return names, None
