"""The relay's view of an outbox row and of what happened when it was published."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str]
    created_at: datetime
    attempts: int

    @classmethod
    def from_record(cls, record: Any) -> OutboxRow:
        return cls(
            record["id"],
            record["message_id"],
            record["topic"],
            record["key"],
            record["payload"],
            _decode_headers(record["headers"]),
            record["created_at"],
            record["attempts"],
        )

    @property
    def ordering_key(self) -> tuple[str, str] | None:
        """Events sharing this are delivered in id order; keyless events have no order."""
        return None if self.key is None else (self.topic, self.key)


class SharedHeaders(dict[str, str]):
    """Decoded headers, shared by every claimed row whose headers column holds the same JSON text,
    with their size in bytes (what the claim budget counts). Never modified: copy it to change it."""

    __slots__ = ("size",)

    def __init__(self, items: dict[str, str]) -> None:
        super().__init__(items)
        self.size = headers_size(items)


def headers_size(headers: Mapping[str, str]) -> int:
    """Bytes of every header name and value (UTF-8): what the claim budget counts for them."""
    if isinstance(headers, SharedHeaders):
        return headers.size
    return sum(len(name.encode()) + len(value.encode()) for name, value in headers.items())


_NO_HEADERS = SharedHeaders({})


def _decode_headers(raw: str | None) -> SharedHeaders:
    if not raw or raw == "{}":
        return _NO_HEADERS
    return _decode_headers_cached(raw)


@lru_cache(maxsize=4096)
def _decode_headers_cached(raw: str) -> SharedHeaders:
    # Events of one producer tend to carry the same headers: decoding (and copying) them for each row
    # cost ~9% of a draining relay's CPU.
    decoded = json.loads(raw)
    # The column is a public contract, so a plain-SQL writer may have stored non-string values.
    return SharedHeaders(
        {str(name): value if isinstance(value, str) else json.dumps(value) for name, value in decoded.items()}
    )


class Outcome(StrEnum):
    """What happened to one event; relay/faults.py says which error leads to which."""

    PUBLISHED = "published"
    UNAVAILABLE = "unavailable"  # the sink (or this topic on it) cannot take events now: no attempt
    DEFERRED = "deferred"  # not sent, so that an earlier event of its key that failed stays ahead
    RETRY = "retry"  # this event failed; retrying may help
    REJECT = "reject"  # this event can never be published as it is: archive it now


@dataclass(frozen=True, slots=True)
class PublishResult:
    outcome: Outcome
    reason: str = ""  # short, stable, low-cardinality: a metric label and the dead-letter reason
    error: str = ""  # the detail, for last_error
    topic_scoped: bool = False  # UNAVAILABLE for this topic only: the sink's other topics flow on

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.PUBLISHED


PUBLISHED = PublishResult(Outcome.PUBLISHED)
DEFERRED = PublishResult(Outcome.DEFERRED, "deferred", "an earlier event of the same key was not published")
