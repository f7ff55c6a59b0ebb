"""Request validation: protobuf requests -> checked domain values, or InvalidArgument naming the field.

Nothing here touches the database, so a rejected request changes nothing.
"""

from __future__ import annotations

import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from control import paging
from control._generated.outbox.control.v1 import control_pb2 as pb
from control.errors import InvalidArgument
from control.model import GLOBAL_PATTERN, DeadLetterFilter, ReplayRequest, Selection

MAX_TOPIC = 249
MAX_REASON = 1000
MAX_IDS = 10_000
MAX_REQUEST_ID = 128
MAX_OPERATOR = 128
MAX_LOCK_NAME = 200
MAX_KEY = 10_000
MAX_ACTION = 100

_MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999


# --- field checks ------------------------------------------------------------------------------


def no_nul(value: str, field: str) -> str:
    """PostgreSQL text cannot hold NUL: caught here, it is the caller's mistake, not an INTERNAL error."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL (\\x00) characters")
    return value


def text(value: str, field: str, limit: int, *, required: bool = False, multiline: bool = False) -> str | None:
    """None for an empty optional value; the value itself when it passes."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; at most {limit} are allowed")
    no_nul(value, field)
    allowed = "\n\t" if multiline else ""
    if any(unicodedata.category(c) == "Cc" and c not in allowed for c in value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def required_text(value: str, field: str, limit: int, *, multiline: bool = False) -> str:
    checked = text(value, field, limit, required=True, multiline=multiline)
    assert checked is not None
    return checked


def positive_id(value: int, field: str) -> int:
    if value <= 0:
        raise InvalidArgument(field, "is required and must be a positive id" if value == 0 else "must be positive")
    return value


def id_list(values: Any, field: str) -> list[int]:
    """Sorted and without duplicates, so that equal sets make equal requests."""
    if len(values) > MAX_IDS:
        raise InvalidArgument(field, f"has {len(values)} ids; at most {MAX_IDS} are allowed")
    for index, value in enumerate(values):
        if value <= 0:
            raise InvalidArgument(f"{field}[{index}]", f"must be a positive id (got {value})")
    return sorted(set(values))


def timestamp(message: Any, field: str) -> datetime:
    if not (_MIN_TIMESTAMP_SECONDS <= message.seconds <= _MAX_TIMESTAMP_SECONDS):
        raise InvalidArgument(field, "is outside 0001-01-01..9999-12-31")
    if not (0 <= message.nanos <= _MAX_NANOS):
        raise InvalidArgument(field, f"has invalid nanos {message.nanos}")
    result: datetime = message.ToDatetime(tzinfo=UTC)
    return result


def duration(message: Any, field: str) -> timedelta:
    seconds, nanos = message.seconds, message.nanos
    if abs(seconds) > _MAX_DURATION_SECONDS or abs(nanos) > _MAX_NANOS or seconds * nanos < 0:
        raise InvalidArgument(field, "is not a valid duration")
    result: timedelta = message.ToTimedelta()
    return result


def message_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, f"is not a UUID: {value[:64]!r}") from None


def operator(value: str) -> str | None:
    return text(value, "operator", MAX_OPERATOR)


# --- requests ----------------------------------------------------------------------------------


def release_lock(request: pb.ReleaseLockRequest) -> tuple[str, str | None, int | None]:
    name = required_text(request.name, "name", MAX_LOCK_NAME)
    holder = token = None
    if request.HasField("expected_holder"):
        holder = required_text(request.expected_holder, "expected_holder", MAX_LOCK_NAME)
    if request.HasField("expected_token"):
        if request.expected_token < 0:
            raise InvalidArgument("expected_token", "must not be negative")
        token = request.expected_token
    if holder is None and token is None:
        raise InvalidArgument("expected_holder", "expected_holder or expected_token is required")
    return name, holder, token


def pause_target(request: pb.PauseRequest | pb.ResumeRequest) -> str:
    which = request.WhichOneof("target")
    if which == "all_topics":
        if not request.all_topics:
            raise InvalidArgument("all_topics", "must be true when set")
        return GLOBAL_PATTERN
    pattern = required_text(request.topic_pattern, "topic_pattern", MAX_TOPIC)
    if pattern != pattern.strip():
        raise InvalidArgument("topic_pattern", "must not start or end with whitespace")
    return pattern


# Glob syntax the relay cannot honour: it translates patterns to SQL LIKE (relay.pauses.glob_to_like),
# which knows '*' and '?' but no character classes. Rejected so that a pause listed as active is one
# the relay obeys. (Resume still accepts them: a pattern stored before this check can be removed.)
UNSUPPORTED_GLOB = "[]"


def pause_pattern(pattern: str) -> str:
    bad = sorted({c for c in pattern if c in UNSUPPORTED_GLOB})
    if bad:
        raise InvalidArgument(
            "topic_pattern",
            f"{' and '.join(repr(c) for c in bad)} are not supported: character classes ([...]) cannot be "
            "honoured by the relay; a pattern knows only '*' (any characters) and '?' (one character)",
        )
    return pattern


def pause(
    request: pb.PauseRequest, now: datetime
) -> tuple[str, str, datetime | None, timedelta | None]:
    pattern = pause_pattern(pause_target(request))
    reason = text(request.reason, "reason", MAX_REASON, multiline=True) or ""
    expires_at = ttl = None
    if request.HasField("expires_at"):
        expires_at = timestamp(request.expires_at, "expires_at")
        if expires_at <= now:
            raise InvalidArgument("expires_at", "must be in the future")
    elif request.HasField("ttl"):
        ttl = duration(request.ttl, "ttl")
        if ttl <= timedelta(0):
            raise InvalidArgument("ttl", "must be positive")
    return pattern, reason, expires_at, ttl


def list_stuck(request: pb.ListStuckRequest, max_page_size: int) -> tuple[str | None, int, int]:
    topic = text(request.topic, "topic", MAX_TOPIC)
    limit = paging.page_size(request.page_size, max_page_size)
    after = paging.decode_token(request.page_token, "stuck") or 0
    return topic, after, limit


def dead_letter_now(request: pb.DeadLetterNowRequest) -> tuple[int | None, uuid.UUID | None, str]:
    which = request.WhichOneof("event")
    outbox_id = message_id = None
    if which == "outbox_id":
        outbox_id = positive_id(request.outbox_id, "outbox_id")
    elif which == "message_id":
        message_id = message_uuid(required_text(request.message_id, "message_id", 64), "message_id")
    else:
        raise InvalidArgument("outbox_id", "outbox_id or message_id is required")
    reason = required_text(request.reason, "reason", MAX_REASON, multiline=True)
    return outbox_id, message_id, reason


def dead_letter_filter(message: pb.DeadLetterFilter, field: str = "filter") -> DeadLetterFilter:
    after = before = None
    if message.HasField("archived_after"):
        after = timestamp(message.archived_after, f"{field}.archived_after")
    if message.HasField("archived_before"):
        before = timestamp(message.archived_before, f"{field}.archived_before")
    if after is not None and before is not None and after > before:
        raise InvalidArgument(f"{field}.archived_before", "is earlier than archived_after")
    key = None
    if message.HasField("key"):
        if len(message.key) > MAX_KEY:
            raise InvalidArgument(f"{field}.key", f"is longer than {MAX_KEY} characters")
        # Keys may hold other control characters (events are written by any service), never NUL.
        key = no_nul(message.key, f"{field}.key")
    return DeadLetterFilter(
        topic=text(message.topic, f"{field}.topic", MAX_TOPIC),
        key=key,
        reason=text(message.reason, f"{field}.reason", MAX_REASON, multiline=True),
        archived_after=after,
        archived_before=before,
    )


def list_dead_letters(
    request: pb.ListDeadLettersRequest, max_page_size: int
) -> tuple[DeadLetterFilter, int, int]:
    where = dead_letter_filter(request.filter)
    limit = paging.page_size(request.page_size, max_page_size)
    after = paging.decode_token(request.page_token, "dead_letters") or 0
    return where, after, limit


def selection(request: pb.ReplayDeadLettersRequest | pb.PurgeDeadLettersRequest) -> Selection:
    has_filter = request.HasField("filter")
    if len(request.ids) and has_filter:
        raise InvalidArgument("ids", "give ids or filter, not both")
    if has_filter:
        where = dead_letter_filter(request.filter)
        if where.is_empty():
            raise InvalidArgument("filter", "needs at least one criterion")
        return Selection(filter=where)
    if not len(request.ids):
        raise InvalidArgument("ids", "ids or filter is required")
    return Selection(ids=id_list(request.ids, "ids"))


def purge_selection(request: pb.PurgeDeadLettersRequest) -> Selection:
    """Like `selection`, plus all_dead_letters: purging the whole archive must be asked for by name."""
    if not request.all_dead_letters:
        if not len(request.ids) and not request.HasField("filter"):
            raise InvalidArgument("ids", "ids, filter or all_dead_letters is required")
        if request.HasField("filter") and not len(request.ids) and dead_letter_filter(request.filter).is_empty():
            raise InvalidArgument("filter", "needs at least one criterion (to purge everything: all_dead_letters)")
        return selection(request)
    if len(request.ids) or request.HasField("filter"):
        raise InvalidArgument("all_dead_letters", "give ids, filter or all_dead_letters, not several")
    return Selection(everything=True)


def replay(request: pb.ReplayDeadLettersRequest) -> ReplayRequest:
    request_id = required_text(request.request_id, "request_id", MAX_REQUEST_ID)
    return ReplayRequest(request_id, selection(request), request.force, request.dry_run)


def list_audit(request: pb.ListAuditRequest, max_page_size: int) -> tuple[str | None, int | None, int]:
    action = text(request.action, "action", MAX_ACTION)
    limit = paging.page_size(request.page_size, max_page_size)
    before = paging.decode_token(request.page_token, "audit")
    return action, before, limit

