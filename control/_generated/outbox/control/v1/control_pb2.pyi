import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayInstance(_message.Message):
    __slots__ = ("instance_id", "hostname", "pid", "version", "started_at", "heartbeat_at", "partitions", "leader")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    hostname: str
    pid: int
    version: str
    started_at: _timestamp_pb2.Timestamp
    heartbeat_at: _timestamp_pb2.Timestamp
    partitions: _containers.RepeatedScalarFieldContainer[int]
    leader: bool
    def __init__(self, instance_id: _Optional[str] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., partitions: _Optional[_Iterable[int]] = ..., leader: _Optional[bool] = ...) -> None: ...

class TopicBacklog(_message.Message):
    __slots__ = ("topic", "pending_count", "oldest_pending_age")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PENDING_COUNT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_FIELD_NUMBER: _ClassVar[int]
    topic: str
    pending_count: int
    oldest_pending_age: _duration_pb2.Duration
    def __init__(self, topic: _Optional[str] = ..., pending_count: _Optional[int] = ..., oldest_pending_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("instances", "backlog", "dead_letter_count", "pauses", "schema_version", "server_time")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[RelayInstance]
    backlog: _containers.RepeatedCompositeFieldContainer[TopicBacklog]
    dead_letter_count: int
    pauses: _containers.RepeatedCompositeFieldContainer[TopicPause]
    schema_version: str
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, instances: _Optional[_Iterable[_Union[RelayInstance, _Mapping]]] = ..., backlog: _Optional[_Iterable[_Union[TopicBacklog, _Mapping]]] = ..., dead_letter_count: _Optional[int] = ..., pauses: _Optional[_Iterable[_Union[TopicPause, _Mapping]]] = ..., schema_version: _Optional[str] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Lock(_message.Message):
    __slots__ = ("name", "holder", "token", "acquired_at", "renewed_at", "expires_at", "expired")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACQUIRED_AT_FIELD_NUMBER: _ClassVar[int]
    RENEWED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    token: int
    acquired_at: _timestamp_pb2.Timestamp
    renewed_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    expired: bool
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., token: _Optional[int] = ..., acquired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., renewed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expired: _Optional[bool] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks",)
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[Lock]
    def __init__(self, locks: _Optional[_Iterable[_Union[Lock, _Mapping]]] = ...) -> None: ...

class ReleaseLockRequest(_message.Message):
    __slots__ = ("name", "expected_holder", "expected_token", "operator")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_holder: str
    expected_token: int
    operator: str
    def __init__(self, name: _Optional[str] = ..., expected_holder: _Optional[str] = ..., expected_token: _Optional[int] = ..., operator: _Optional[str] = ...) -> None: ...

class ReleaseLockResponse(_message.Message):
    __slots__ = ("lock",)
    LOCK_FIELD_NUMBER: _ClassVar[int]
    lock: Lock
    def __init__(self, lock: _Optional[_Union[Lock, _Mapping]] = ...) -> None: ...

class TopicPause(_message.Message):
    __slots__ = ("id", "topic_pattern", "reason", "paused_by", "created_at", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_PATTERN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    topic_pattern: str
    reason: str
    paused_by: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., topic_pattern: _Optional[str] = ..., reason: _Optional[str] = ..., paused_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("topic_pattern", "all_topics", "reason", "expires_at", "ttl", "operator")
    TOPIC_PATTERN_FIELD_NUMBER: _ClassVar[int]
    ALL_TOPICS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    topic_pattern: str
    all_topics: bool
    reason: str
    expires_at: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    operator: str
    def __init__(self, topic_pattern: _Optional[str] = ..., all_topics: _Optional[bool] = ..., reason: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., operator: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("pause",)
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    pause: TopicPause
    def __init__(self, pause: _Optional[_Union[TopicPause, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("topic_pattern", "all_topics", "operator")
    TOPIC_PATTERN_FIELD_NUMBER: _ClassVar[int]
    ALL_TOPICS_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    topic_pattern: str
    all_topics: bool
    operator: str
    def __init__(self, topic_pattern: _Optional[str] = ..., all_topics: _Optional[bool] = ..., operator: _Optional[str] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("resumed", "pause")
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    resumed: bool
    pause: TopicPause
    def __init__(self, resumed: _Optional[bool] = ..., pause: _Optional[_Union[TopicPause, _Mapping]] = ...) -> None: ...

class ListPausesRequest(_message.Message):
    __slots__ = ("include_expired",)
    INCLUDE_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    include_expired: bool
    def __init__(self, include_expired: _Optional[bool] = ...) -> None: ...

class ListPausesResponse(_message.Message):
    __slots__ = ("pauses",)
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    pauses: _containers.RepeatedCompositeFieldContainer[TopicPause]
    def __init__(self, pauses: _Optional[_Iterable[_Union[TopicPause, _Mapping]]] = ...) -> None: ...

class StuckEvent(_message.Message):
    __slots__ = ("id", "message_id", "topic", "key", "attempts", "last_error", "next_attempt_at", "first_attempt_at", "last_attempt_at", "created_at", "partition")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    FIRST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    id: int
    message_id: str
    topic: str
    key: str
    attempts: int
    last_error: str
    next_attempt_at: _timestamp_pb2.Timestamp
    first_attempt_at: _timestamp_pb2.Timestamp
    last_attempt_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    partition: int
    def __init__(self, id: _Optional[int] = ..., message_id: _Optional[str] = ..., topic: _Optional[str] = ..., key: _Optional[str] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., first_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., partition: _Optional[int] = ...) -> None: ...

class ListStuckRequest(_message.Message):
    __slots__ = ("topic", "page_size", "page_token")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    topic: str
    page_size: int
    page_token: str
    def __init__(self, topic: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListStuckResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StuckEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[StuckEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeadLetterSummary(_message.Message):
    __slots__ = ("id", "outbox_id", "message_id", "topic", "key", "attempts", "reason", "last_error", "created_at", "first_attempt_at", "last_attempt_at", "archived_at", "archived_by", "payload_size", "replay_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FIRST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_AT_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_BY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: int
    outbox_id: int
    message_id: str
    topic: str
    key: str
    attempts: int
    reason: str
    last_error: str
    created_at: _timestamp_pb2.Timestamp
    first_attempt_at: _timestamp_pb2.Timestamp
    last_attempt_at: _timestamp_pb2.Timestamp
    archived_at: _timestamp_pb2.Timestamp
    archived_by: str
    payload_size: int
    replay_count: int
    def __init__(self, id: _Optional[int] = ..., outbox_id: _Optional[int] = ..., message_id: _Optional[str] = ..., topic: _Optional[str] = ..., key: _Optional[str] = ..., attempts: _Optional[int] = ..., reason: _Optional[str] = ..., last_error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., first_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., archived_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., archived_by: _Optional[str] = ..., payload_size: _Optional[int] = ..., replay_count: _Optional[int] = ...) -> None: ...

class ReplayRecord(_message.Message):
    __slots__ = ("request_id", "new_message_id", "forced", "replayed_by", "replayed_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_BY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_message_id: str
    forced: bool
    replayed_by: str
    replayed_at: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., new_message_id: _Optional[str] = ..., forced: _Optional[bool] = ..., replayed_by: _Optional[str] = ..., replayed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("summary", "payload", "headers", "replays")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    summary: DeadLetterSummary
    payload: bytes
    headers: _containers.ScalarMap[str, str]
    replays: _containers.RepeatedCompositeFieldContainer[ReplayRecord]
    def __init__(self, summary: _Optional[_Union[DeadLetterSummary, _Mapping]] = ..., payload: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., replays: _Optional[_Iterable[_Union[ReplayRecord, _Mapping]]] = ...) -> None: ...

class DeadLetterFilter(_message.Message):
    __slots__ = ("topic", "key", "reason", "archived_after", "archived_before")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_AFTER_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    topic: str
    key: str
    reason: str
    archived_after: _timestamp_pb2.Timestamp
    archived_before: _timestamp_pb2.Timestamp
    def __init__(self, topic: _Optional[str] = ..., key: _Optional[str] = ..., reason: _Optional[str] = ..., archived_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., archived_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: DeadLetterFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[DeadLetterFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_page_token")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetterSummary]
    next_page_token: str
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetterSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDeadLetterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetDeadLetterResponse(_message.Message):
    __slots__ = ("dead_letter",)
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    dead_letter: DeadLetter
    def __init__(self, dead_letter: _Optional[_Union[DeadLetter, _Mapping]] = ...) -> None: ...

class DeadLetterNowRequest(_message.Message):
    __slots__ = ("outbox_id", "message_id", "reason", "operator")
    OUTBOX_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    outbox_id: int
    message_id: str
    reason: str
    operator: str
    def __init__(self, outbox_id: _Optional[int] = ..., message_id: _Optional[str] = ..., reason: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class DeadLetterNowResponse(_message.Message):
    __slots__ = ("dead_letter",)
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    dead_letter: DeadLetterSummary
    def __init__(self, dead_letter: _Optional[_Union[DeadLetterSummary, _Mapping]] = ...) -> None: ...

class ReplayDeadLettersRequest(_message.Message):
    __slots__ = ("request_id", "ids", "filter", "force", "dry_run", "operator")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    filter: DeadLetterFilter
    force: bool
    dry_run: bool
    operator: str
    def __init__(self, request_id: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., filter: _Optional[_Union[DeadLetterFilter, _Mapping]] = ..., force: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., operator: _Optional[str] = ...) -> None: ...

class ReplayDeadLettersResponse(_message.Message):
    __slots__ = ("replayed_count", "skipped_already_replayed_count", "not_found_count", "replayed_ids", "skipped_already_replayed_ids", "not_found_ids", "ids_truncated", "dry_run")
    REPLAYED_COUNT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ALREADY_REPLAYED_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ALREADY_REPLAYED_IDS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_IDS_FIELD_NUMBER: _ClassVar[int]
    IDS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    replayed_count: int
    skipped_already_replayed_count: int
    not_found_count: int
    replayed_ids: _containers.RepeatedScalarFieldContainer[int]
    skipped_already_replayed_ids: _containers.RepeatedScalarFieldContainer[int]
    not_found_ids: _containers.RepeatedScalarFieldContainer[int]
    ids_truncated: bool
    dry_run: bool
    def __init__(self, replayed_count: _Optional[int] = ..., skipped_already_replayed_count: _Optional[int] = ..., not_found_count: _Optional[int] = ..., replayed_ids: _Optional[_Iterable[int]] = ..., skipped_already_replayed_ids: _Optional[_Iterable[int]] = ..., not_found_ids: _Optional[_Iterable[int]] = ..., ids_truncated: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PurgeDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "filter", "dry_run", "operator", "all_dead_letters")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    ALL_DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    filter: DeadLetterFilter
    dry_run: bool
    operator: str
    all_dead_letters: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., filter: _Optional[_Union[DeadLetterFilter, _Mapping]] = ..., dry_run: _Optional[bool] = ..., operator: _Optional[str] = ..., all_dead_letters: _Optional[bool] = ...) -> None: ...

class PurgeDeadLettersResponse(_message.Message):
    __slots__ = ("purged_count", "not_found_count", "dry_run")
    PURGED_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_COUNT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    purged_count: int
    not_found_count: int
    dry_run: bool
    def __init__(self, purged_count: _Optional[int] = ..., not_found_count: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at", "actor", "action", "arguments_json", "result_json", "client_identity")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: _timestamp_pb2.Timestamp
    actor: str
    action: str
    arguments_json: str
    result_json: str
    client_identity: str
    def __init__(self, id: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., arguments_json: _Optional[str] = ..., result_json: _Optional[str] = ..., client_identity: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "action")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    action: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
