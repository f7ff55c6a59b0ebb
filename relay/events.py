"""The relay's view of an outbox row and of what happened when it was published."""

from __future__ import annotations

import json
import uuid
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
            id=record["id"],
            message_id=record["message_id"],
            topic=record["topic"],
            key=record["key"],
            payload=record["payload"],
            headers=_decode_headers(record["headers"]),
            created_at=record["created_at"],
            attempts=record["attempts"],
        )

    @property
    def ordering_key(self) -> tuple[str, str] | None:
        """Events sharing this are delivered in id order; keyless events have no order."""
        return None if self.key is None else (self.topic, self.key)


def _decode_headers(raw: str | None) -> dict[str, str]:
    if not raw or raw == "{}":
        return {}
    return dict(_decode_headers_cached(raw))


@lru_cache(maxsize=4096)
def _decode_headers_cached(raw: str) -> tuple[tuple[str, str], ...]:
    # Events of one producer tend to carry the same headers; decoding each row again cost ~9% CPU.
    decoded = json.loads(raw)
    # The column is a public contract, so a plain-SQL writer may have stored non-string values.
    return tuple(
        (str(name), value if isinstance(value, str) else json.dumps(value)) for name, value in decoded.items()
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
