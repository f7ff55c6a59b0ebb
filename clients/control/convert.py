"""Protobuf messages <-> the Python values of the control client: responses to result types,
arguments to request messages (validated here, so that a bad argument fails before any call)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from clients.control.errors import InvalidArgument
from clients.control.results import (
    AuditEntry,
    DeadLetter,
    DeadLetterSummary,
    Instance,
    Lock,
    Pause,
    PurgeResult,
    ReplayRecord,
    ReplayResult,
    Status,
    StuckEvent,
    TopicBacklog,
)
from control._generated.outbox.control.v1 import control_pb2 as pb


def timestamp(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


def set_timestamp(target: Any, value: datetime, name: str) -> None:
    """Sets the google.protobuf.Timestamp field `target` (a sub-message) from an aware datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name}: must be a timezone-aware datetime")
    target.FromDatetime(value.astimezone(UTC))


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _optional(message: Any, name: str) -> str | None:
    return getattr(message, name) if message.HasField(name) else None


def _json(text: str) -> Mapping[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_value": value}


def pause(m: pb.TopicPause) -> Pause:
    return Pause(m.id, m.topic_pattern, m.reason, m.paused_by, timestamp(m, "created_at"), timestamp(m, "expires_at"))


def instance(m: pb.RelayInstance) -> Instance:
    return Instance(
        m.instance_id, m.hostname, m.pid, m.version, timestamp(m, "started_at"), timestamp(m, "heartbeat_at"),
        tuple(m.partitions), m.leader,
    )


def status(m: pb.GetStatusResponse) -> Status:
    return Status(
        instances=tuple(instance(i) for i in m.instances),
        backlog=tuple(
            TopicBacklog(b.topic, b.pending_count, b.oldest_pending_age.ToTimedelta()) for b in m.backlog
        ),
        dead_letter_count=m.dead_letter_count,
        pauses=tuple(pause(p) for p in m.pauses),
        schema_version=m.schema_version,
        server_time=timestamp(m, "server_time"),
    )


def lock(m: pb.Lock) -> Lock:
    return Lock(
        m.name, m.holder or None, m.token, timestamp(m, "acquired_at"), timestamp(m, "renewed_at"),
        timestamp(m, "expires_at"), m.expired,
    )


def stuck_event(m: pb.StuckEvent) -> StuckEvent:
    return StuckEvent(
        id=m.id,
        message_id=uuid.UUID(m.message_id),
        topic=m.topic,
        key=_optional(m, "key"),
        attempts=m.attempts,
        last_error=m.last_error or None,
        next_attempt_at=timestamp(m, "next_attempt_at"),
        first_attempt_at=timestamp(m, "first_attempt_at"),
        last_attempt_at=timestamp(m, "last_attempt_at"),
        created_at=timestamp(m, "created_at"),
        partition=m.partition,
    )


def summary(m: pb.DeadLetterSummary) -> DeadLetterSummary:
    return DeadLetterSummary(
        id=m.id,
        outbox_id=m.outbox_id,
        message_id=uuid.UUID(m.message_id),
        topic=m.topic,
        key=_optional(m, "key"),
        attempts=m.attempts,
        reason=m.reason,
        last_error=m.last_error or None,
        created_at=timestamp(m, "created_at"),
        first_attempt_at=timestamp(m, "first_attempt_at"),
        last_attempt_at=timestamp(m, "last_attempt_at"),
        archived_at=timestamp(m, "archived_at"),
        archived_by=m.archived_by,
        payload_size=m.payload_size,
        replay_count=m.replay_count,
    )


def dead_letter(m: pb.DeadLetter) -> DeadLetter:
    return DeadLetter(
        summary=summary(m.summary),
        payload=bytes(m.payload),
        headers=dict(sorted(m.headers.items())),
        replays=tuple(
            ReplayRecord(r.request_id, _uuid(r.new_message_id), r.forced, r.replayed_by, timestamp(r, "replayed_at"))
            for r in m.replays
        ),
    )


def replay_result(request_id: str) -> Callable[[pb.ReplayDeadLettersResponse], ReplayResult]:
    def convert(m: pb.ReplayDeadLettersResponse) -> ReplayResult:
        return ReplayResult(
            request_id=request_id,
            replayed_count=m.replayed_count,
            skipped_already_replayed_count=m.skipped_already_replayed_count,
            not_found_count=m.not_found_count,
            replayed_ids=tuple(m.replayed_ids),
            skipped_already_replayed_ids=tuple(m.skipped_already_replayed_ids),
            not_found_ids=tuple(m.not_found_ids),
            ids_truncated=m.ids_truncated,
            dry_run=m.dry_run,
        )

    return convert


def audit_entry(m: pb.AuditEntry) -> AuditEntry:
    return AuditEntry(
        m.id, timestamp(m, "at"), m.actor, m.action, _json(m.arguments_json), _json(m.result_json),
        m.client_identity or None,
    )


def page_token(value: str) -> str | None:
    return value or None


def page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size: must not be negative (got {page_size})")
    return page_size


def dead_letter_filter(
    topic: str | None,
    key: str | None,
    reason: str | None,
    archived_after: datetime | None,
    archived_before: datetime | None,
) -> pb.DeadLetterFilter | None:
    if topic is None and key is None and reason is None and archived_after is None and archived_before is None:
        return None
    message = pb.DeadLetterFilter(topic=topic or "", reason=reason or "")
    if key is not None:
        message.key = key
    if archived_after is not None:
        set_timestamp(message.archived_after, archived_after, "archived_after")
    if archived_before is not None:
        set_timestamp(message.archived_before, archived_before, "archived_before")
    return message


def _ids(ids: Sequence[int] | None) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)):
        raise InvalidArgument("ids: must be a sequence of integers")
    return [int(i) for i in ids]


def selection(ids: Sequence[int] | None, where: pb.DeadLetterFilter | None) -> dict[str, Any]:
    chosen = _ids(ids)
    if chosen is not None and where is not None:
        raise InvalidArgument("ids: give ids or filter criteria, not both")
    if chosen is None and where is None:
        raise InvalidArgument("ids: ids or at least one filter criterion is required")
    if chosen is not None and not chosen:
        raise InvalidArgument("ids: is empty")
    return {"ids": chosen} if chosen is not None else {"filter": where}


def parse_event_ref(event: int | str | uuid.UUID) -> tuple[int | None, uuid.UUID | None]:
    """An outbox id (int, or a string of digits) or a message id (UUID or its text)."""
    if isinstance(event, bool):
        raise InvalidArgument("event: must be an outbox id or a message UUID")
    if isinstance(event, int):
        if event <= 0:
            raise InvalidArgument(f"outbox_id: must be positive (got {event})")
        return event, None
    if isinstance(event, uuid.UUID):
        return None, event
    text = str(event).strip()
    if text.isdigit():
        return parse_event_ref(int(text))
    try:
        return None, uuid.UUID(text)
    except ValueError:
        raise InvalidArgument(f"event: {text[:64]!r} is neither an outbox id nor a message UUID") from None


def purge_result(m: pb.PurgeDeadLettersResponse) -> PurgeResult:
    return PurgeResult(m.purged_count, m.not_found_count, m.dry_run)
