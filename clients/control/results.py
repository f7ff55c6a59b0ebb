"""What the control client returns: plain frozen dataclasses (aware ``datetime``, ``timedelta``,
``UUID``), never protobuf messages. The server's model (control/model.py) uses the same field names."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

__all__ = [
    "AuditEntry",
    "DeadLetter",
    "DeadLetterSummary",
    "Instance",
    "Lock",
    "Page",
    "Pause",
    "PurgeResult",
    "ReplayRecord",
    "ReplayResult",
    "Status",
    "StuckEvent",
    "TopicBacklog",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_page_token`` back for the next one (None: last page)."""

    items: tuple[T, ...]
    next_page_token: str | None = None


@dataclass(frozen=True)
class Instance:
    """A relay instance that heartbeated recently and has not stopped."""

    instance_id: str
    hostname: str
    pid: int
    version: str
    started_at: datetime | None
    heartbeat_at: datetime | None
    partitions: tuple[int, ...]
    leader: bool


@dataclass(frozen=True)
class TopicBacklog:
    topic: str
    pending_count: int
    oldest_pending_age: timedelta


@dataclass(frozen=True)
class Pause:
    id: int
    topic_pattern: str
    reason: str
    paused_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: until resumed


@dataclass(frozen=True)
class Status:
    instances: tuple[Instance, ...]
    backlog: tuple[TopicBacklog, ...]
    dead_letter_count: int
    pauses: tuple[Pause, ...]
    schema_version: str
    server_time: datetime | None


@dataclass(frozen=True)
class Lock:
    name: str
    holder: str | None  # None: nobody holds the lease
    token: int
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None
    expired: bool


@dataclass(frozen=True)
class StuckEvent:
    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime | None
    partition: int


@dataclass(frozen=True)
class DeadLetterSummary:
    id: int
    outbox_id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    attempts: int
    reason: str
    last_error: str | None
    created_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    archived_at: datetime | None
    archived_by: str
    payload_size: int
    replay_count: int


@dataclass(frozen=True)
class ReplayRecord:
    request_id: str
    new_message_id: uuid.UUID | None
    forced: bool
    replayed_by: str
    replayed_at: datetime | None


@dataclass(frozen=True)
class DeadLetter:
    summary: DeadLetterSummary
    payload: bytes = field(repr=False)
    headers: Mapping[str, str]
    replays: tuple[ReplayRecord, ...]

    @property
    def id(self) -> int:
        return self.summary.id

    @property
    def payload_text(self) -> str | None:
        """The payload decoded as UTF-8, or None if it is not valid UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None


@dataclass(frozen=True)
class ReplayResult:
    request_id: str
    replayed_count: int
    skipped_already_replayed_count: int
    not_found_count: int
    replayed_ids: tuple[int, ...]
    skipped_already_replayed_ids: tuple[int, ...]
    not_found_ids: tuple[int, ...]
    ids_truncated: bool
    dry_run: bool


@dataclass(frozen=True)
class PurgeResult:
    purged_count: int
    not_found_count: int
    dry_run: bool


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime | None
    actor: str
    action: str
    arguments: Mapping[str, Any]
    result: Mapping[str, Any]
    # Verified by the server: 'cn:<CN>' of an mTLS client certificate, 'token:admin' or 'anonymous';
    # None for entries written before the server recorded it. (The operator in `actor` is declared.)
    client_identity: str | None = None
