"""Domain values -> protobuf messages (the generated classes accept datetime/timedelta and None)."""

from __future__ import annotations

import json
from typing import Any

from control._generated.outbox.control.v1 import control_pb2 as pb
from control.model import (
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
)


def status(value: Status) -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        instances=[instance(i) for i in value.instances],
        backlog=[
            pb.TopicBacklog(topic=b.topic, pending_count=b.pending_count, oldest_pending_age=b.oldest_pending_age)
            for b in value.backlog
        ],
        dead_letter_count=value.dead_letter_count,
        pauses=[pause(p) for p in value.pauses],
        schema_version=value.schema_version,
        server_time=value.server_time,
    )


def instance(value: Instance) -> pb.RelayInstance:
    return pb.RelayInstance(
        instance_id=value.instance_id,
        hostname=value.hostname,
        pid=value.pid,
        version=value.version,
        started_at=value.started_at,
        heartbeat_at=value.heartbeat_at,
        partitions=value.partitions,
        leader=value.leader,
    )


def lock(value: Lock) -> pb.Lock:
    return pb.Lock(
        name=value.name,
        holder=value.holder or "",
        token=value.token,
        acquired_at=value.acquired_at,
        renewed_at=value.renewed_at,
        expires_at=value.expires_at,
        expired=value.expired,
    )


def pause(value: Pause) -> pb.TopicPause:
    return pb.TopicPause(
        id=value.id,
        topic_pattern=value.topic_pattern,
        reason=value.reason,
        paused_by=value.paused_by,
        created_at=value.created_at,
        expires_at=value.expires_at,
    )


def stuck(value: StuckEvent) -> pb.StuckEvent:
    return pb.StuckEvent(
        id=value.id,
        message_id=str(value.message_id),
        topic=value.topic,
        key=value.key,
        attempts=value.attempts,
        last_error=value.last_error or "",
        next_attempt_at=value.next_attempt_at,
        first_attempt_at=value.first_attempt_at,
        last_attempt_at=value.last_attempt_at,
        created_at=value.created_at,
        partition=value.partition,
    )


def summary(value: DeadLetterSummary) -> pb.DeadLetterSummary:
    return pb.DeadLetterSummary(
        id=value.id,
        outbox_id=value.outbox_id,
        message_id=str(value.message_id),
        topic=value.topic,
        key=value.key,
        attempts=value.attempts,
        reason=value.reason,
        last_error=value.last_error or "",
        created_at=value.created_at,
        first_attempt_at=value.first_attempt_at,
        last_attempt_at=value.last_attempt_at,
        archived_at=value.archived_at,
        archived_by=value.archived_by,
        payload_size=value.payload_size,
        replay_count=value.replay_count,
    )


def dead_letter(value: DeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(
        summary=summary(value.summary),
        payload=value.payload,
        headers={name: _header_text(v) for name, v in value.headers.items()},
        replays=[replay_record(r) for r in value.replays],
    )


def _header_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def replay_record(value: ReplayRecord) -> pb.ReplayRecord:
    return pb.ReplayRecord(
        request_id=value.request_id,
        new_message_id=str(value.new_message_id),
        forced=value.forced,
        replayed_by=value.replayed_by,
        replayed_at=value.replayed_at,
    )


def replay_result(value: ReplayResult) -> pb.ReplayDeadLettersResponse:
    return pb.ReplayDeadLettersResponse(
        replayed_count=value.replayed_count,
        skipped_already_replayed_count=value.skipped_already_replayed_count,
        not_found_count=value.not_found_count,
        replayed_ids=value.replayed_ids,
        skipped_already_replayed_ids=value.skipped_already_replayed_ids,
        not_found_ids=value.not_found_ids,
        ids_truncated=value.ids_truncated,
        dry_run=value.dry_run,
    )


def purge_result(value: PurgeResult) -> pb.PurgeDeadLettersResponse:
    return pb.PurgeDeadLettersResponse(
        purged_count=value.purged_count, not_found_count=value.not_found_count, dry_run=value.dry_run
    )


def audit_entry(value: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=value.id,
        at=value.at,
        actor=value.actor,
        action=value.action,
        arguments_json=value.arguments_json,
        result_json=value.result_json,
        client_identity=value.client_identity or "",
    )
