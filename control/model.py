"""The control plane's domain values: what the servicer asks of the store and what the store returns.

Plain dataclasses, free of SQL and protobuf, so each side can change without the other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar
from uuid import UUID

T = TypeVar("T")

# Each id list in a replay result is cut here so that a filter matching millions stays answerable.
MAX_RESULT_IDS = 10_000
GLOBAL_PATTERN = "*"


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass(frozen=True)
class Audit:
    """Who does what, recorded in audit_log in the same transaction as the change."""

    actor: str
    action: str
    arguments: dict[str, Any]
    # Verified by the server (mTLS certificate CN or token role), unlike the operator in `actor`.
    client_identity: str | None = None


@dataclass(frozen=True)
class Instance:
    instance_id: str
    hostname: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    partitions: list[int]
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
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class Status:
    instances: list[Instance]
    backlog: list[TopicBacklog]
    dead_letter_count: int
    pauses: list[Pause]
    schema_version: str
    server_time: datetime


@dataclass(frozen=True)
class Lock:
    name: str
    holder: str | None
    token: int
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime
    expired: bool


@dataclass(frozen=True)
class StuckEvent:
    id: int
    message_id: UUID
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime
    partition: int


@dataclass(frozen=True)
class DeadLetterSummary:
    id: int
    outbox_id: int
    message_id: UUID
    topic: str
    key: str | None
    attempts: int
    reason: str
    last_error: str | None
    created_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    archived_at: datetime
    archived_by: str
    payload_size: int
    replay_count: int


@dataclass(frozen=True)
class ReplayRecord:
    request_id: str
    new_message_id: UUID
    forced: bool
    replayed_by: str
    replayed_at: datetime


@dataclass(frozen=True)
class DeadLetter:
    summary: DeadLetterSummary
    payload: bytes
    headers: dict[str, Any]
    replays: list[ReplayRecord]


@dataclass(frozen=True)
class DeadLetterFilter:
    """Every criterion that is set must match; None means "any"."""

    topic: str | None = None
    key: str | None = None
    reason: str | None = None
    archived_after: datetime | None = None
    archived_before: datetime | None = None

    def is_empty(self) -> bool:
        return all(value is None for value in self.sql_args())

    def sql_args(self) -> tuple[Any, ...]:
        """$1..$5 of every statement using control/queries.sql's {fragment:dead_letter_filter}."""
        return (self.topic, self.key, self.reason, self.archived_after, self.archived_before)

    def as_json(self) -> dict[str, Any]:
        values = {
            "topic": self.topic,
            "key": self.key,
            "reason": self.reason,
            "archived_after": self.archived_after.isoformat() if self.archived_after else None,
            "archived_before": self.archived_before.isoformat() if self.archived_before else None,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class Selection:
    """Dead letters chosen by id (sorted, unique), by a non-empty filter, or all of them (purge only,
    asked for explicitly); exactly one is set."""

    ids: list[int] | None = None
    filter: DeadLetterFilter | None = None
    everything: bool = False

    def as_json(self) -> dict[str, Any]:
        if self.ids is not None:
            return {"ids": self.ids}
        if self.everything:
            return {"all_dead_letters": True}
        return {"filter": self.filter.as_json() if self.filter else {}}


@dataclass(frozen=True)
class ReplayRequest:
    request_id: str
    selection: Selection
    force: bool
    dry_run: bool

    def fingerprint(self) -> str:
        """Identifies what is asked, not how (dry_run) or by whom: a retry must match its original."""
        canonical = json.dumps({**self.selection.as_json(), "force": self.force}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def audit_arguments(self) -> dict[str, Any]:
        return {"request_id": self.request_id, **self.selection.as_json(), "force": self.force}


@dataclass
class ReplayResult:
    replayed_ids: list[int] = field(default_factory=list)
    skipped_already_replayed_ids: list[int] = field(default_factory=list)
    not_found_ids: list[int] = field(default_factory=list)
    replayed_count: int = 0
    skipped_already_replayed_count: int = 0
    not_found_count: int = 0
    dry_run: bool = False

    @property
    def ids_truncated(self) -> bool:
        return (
            self.replayed_count > len(self.replayed_ids)
            or self.skipped_already_replayed_count > len(self.skipped_already_replayed_ids)
            or self.not_found_count > len(self.not_found_ids)
        )

    def add(self, replayed: list[int], skipped: list[int], not_found: list[int]) -> None:
        self.replayed_count += len(replayed)
        self.skipped_already_replayed_count += len(skipped)
        self.not_found_count += len(not_found)
        _extend_capped(self.replayed_ids, replayed)
        _extend_capped(self.skipped_already_replayed_ids, skipped)
        _extend_capped(self.not_found_ids, not_found)

    def counts(self) -> dict[str, int]:
        return {
            "replayed_count": self.replayed_count,
            "skipped_already_replayed_count": self.skipped_already_replayed_count,
            "not_found_count": self.not_found_count,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            **self.counts(),
            "replayed_ids": self.replayed_ids,
            "skipped_already_replayed_ids": self.skipped_already_replayed_ids,
            "not_found_ids": self.not_found_ids,
        }

    @classmethod
    def from_json(cls, stored: dict[str, Any], *, dry_run: bool) -> ReplayResult:
        return cls(
            replayed_ids=list(stored["replayed_ids"]),
            skipped_already_replayed_ids=list(stored["skipped_already_replayed_ids"]),
            not_found_ids=list(stored["not_found_ids"]),
            replayed_count=int(stored["replayed_count"]),
            skipped_already_replayed_count=int(stored["skipped_already_replayed_count"]),
            not_found_count=int(stored["not_found_count"]),
            dry_run=dry_run,
        )


def _extend_capped(target: list[int], more: list[int]) -> None:
    target.extend(more[: max(0, MAX_RESULT_IDS - len(target))])


@dataclass(frozen=True)
class PurgeResult:
    purged_count: int
    not_found_count: int
    dry_run: bool

    def as_json(self) -> dict[str, Any]:
        return {"purged_count": self.purged_count, "not_found_count": self.not_found_count}


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    arguments_json: str
    result_json: str
    client_identity: str | None = None
