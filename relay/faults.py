"""The relay's fault model: every error it can meet, from any dependency, falls in one of four kinds.

| kind              | meaning                                   | what the relay does                              |
|-------------------|-------------------------------------------|--------------------------------------------------|
| DATABASE_TRANSIENT| Postgres is unavailable for a while       | retry with backoff, stay up, report in /readyz   |
| SINK_UNAVAILABLE  | the broker cannot take events right now;  | no attempt counted, never dead-lettered; back    |
|                   | nothing is wrong with the event           | off per sink, or per topic when the cause is one |
| EVENT_REJECTED    | this event cannot be accepted as it is    | count an attempt (or archive at once when no     |
|                   |                                           | retry can help)                                  |
| BROKEN            | a bug or a state no retry repairs         | log with traceback, restart the task with        |
|                   |                                           | backoff; give up with a non-zero exit            |

docs/operations.md ("Fault model") is the operator's version of this table. The sinks and the
store classify with the functions here, so the answer to "is this the event's fault?" is given
once for the whole relay."""

from __future__ import annotations

import asyncio
from enum import StrEnum

import asyncpg
from aiokafka import errors as kafka_errors
from redis import exceptions as redis_errors


class Fault(StrEnum):
    DATABASE_TRANSIENT = "database_transient"
    SINK_UNAVAILABLE = "sink_unavailable"
    EVENT_REJECTED = "event_rejected"
    BROKEN = "broken"


# -- PostgreSQL ---------------------------------------------------------------------------------

# Errors that say "the database is unavailable (for now)", never "this statement is wrong":
# connection loss (class 08), operator intervention (class 57: 57014 query cancelled or
# statement_timeout, 57P01-57P05 shutdowns and idle timeouts), 55P03 lock timeout, 25006 read-only
# after a failover, class 40 serialization failures and deadlocks, class 53 resources (53300 too
# many connections), class 28 authentication (a rotated password), and the client's own view of a
# lost connection.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.LockNotAvailableError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    # Seen on a pool connection caught mid-operation by a server restart.
    asyncpg.InternalClientError,
)

TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "40", "53", "28")
TRANSIENT_SQLSTATES = ("55P03", "25006", "25P03")


def is_transient_db_error(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_DB_ERRORS):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and (
        sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    )


def classify_db_error(exc: BaseException) -> Fault:
    return Fault.DATABASE_TRANSIENT if is_transient_db_error(exc) else Fault.BROKEN


# The `kind` label of outbox_database_errors_total: a handful of values an operator can act on.
_DB_ERROR_KINDS_BY_SQLSTATE = {
    "57014": "query_canceled",  # pg_cancel_backend, statement_timeout
    "55P03": "lock_timeout",
    "25006": "read_only",  # a standby after failover
    "25P03": "idle_timeout",
    "57P05": "idle_timeout",
    "40P01": "deadlock",
    "40001": "serialization",
}
_DB_ERROR_KINDS_BY_CLASS = {
    "08": "connection",
    "57": "shutdown",  # 57P01 admin shutdown (pg_terminate_backend), 57P02 crash, 57P03 starting up
    "40": "serialization",
    "53": "resources",  # 53300 too many connections
    "28": "authentication",  # a rotated password
}


def db_error_kind(exc: BaseException) -> str:
    """A short, bounded name for a transient database error (`other` when it is not one)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        kind = _DB_ERROR_KINDS_BY_SQLSTATE.get(sqlstate) or _DB_ERROR_KINDS_BY_CLASS.get(sqlstate[:2])
        if kind is not None:
            return kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return "connection"
    return "other"


# -- Kafka --------------------------------------------------------------------------------------

# Refusals that concern the record itself: retrying the same bytes cannot help.
KAFKA_REJECTIONS: dict[type[BaseException], str] = {
    kafka_errors.MessageSizeTooLargeError: "record_too_large",
    kafka_errors.RecordListTooLargeError: "record_too_large",
    kafka_errors.InvalidTopicError: "invalid_topic",
    kafka_errors.CorruptRecordException: "corrupt_record",
}
KAFKA_SIZE_REFUSALS = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)

# The broker refuses the client, not the event: an ACL slip must not archive a whole topic.
KAFKA_NOT_AUTHORIZED = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.AuthenticationMethodNotSupported,
)
# Per topic rather than per broker: the rest of the sink keeps flowing while these back off.
KAFKA_TOPIC_SCOPED = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.UnknownTopicOrPartitionError,
    kafka_errors.LeaderNotAvailableError,
    kafka_errors.NotLeaderForPartitionError,
    kafka_errors.NotEnoughReplicasError,
    kafka_errors.NotEnoughReplicasAfterAppendError,
)


def classify_kafka_error(exc: BaseException) -> tuple[Fault, str]:
    """(kind, reason) of an error met while publishing one record. Unknown topics are decided by
    the sink, which alone knows whether the broker answered (see KafkaSink._classify)."""
    for kind, reason in KAFKA_REJECTIONS.items():
        if isinstance(exc, kind):
            return Fault.EVENT_REJECTED, reason
    if isinstance(exc, KAFKA_NOT_AUTHORIZED):
        return Fault.SINK_UNAVAILABLE, "not_authorized"
    if isinstance(exc, kafka_errors.KafkaError) and not getattr(exc, "retriable", False):
        if isinstance(exc, (kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError)):
            return Fault.SINK_UNAVAILABLE, "broker_unavailable"
        # Unknown non-retriable broker answer: the event is suspect, but only after attempts.
        return Fault.EVENT_REJECTED, "publish_failed"
    # Connection loss, timeouts, leader elections, metadata trouble and every other error the
    # broker itself marks retriable; and anything that is not a Kafka error at all (a cancelled
    # delivery, a closed producer) says nothing about the event either.
    return Fault.SINK_UNAVAILABLE, "broker_unavailable"


def kafka_error_is_topic_scoped(exc: BaseException) -> bool:
    return isinstance(exc, KAFKA_TOPIC_SCOPED)


# -- Redis --------------------------------------------------------------------------------------

# Error prefixes that describe the server's state, not the entry: out of memory under noeviction,
# a replica after failover, loading its data set, no master, not enough replicas, failed
# persistence, a busy script, a cluster in trouble, and access control (scripts or XADD denied,
# wrong password after a rotation).
REDIS_SERVER_STATES = (
    "OOM",
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "NOREPLICAS",
    "MISCONF",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOPERM",
    "NOAUTH",
    "WRONGPASS",
    "NOSCRIPT",
)


# redis-py turns some of those prefixes into exception classes and drops the prefix from the text.
REDIS_SERVER_STATE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # also LOADING (BusyLoadingError) and NOAUTH/WRONGPASS
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.NoPermissionError,
    redis_errors.NoScriptError,
    redis_errors.AskError,
    redis_errors.MovedError,
)


def classify_redis_error(exc: BaseException) -> tuple[Fault, str]:
    """(kind, reason) of an exception redis-py raised or returned for one XADD (or a whole call)."""
    if isinstance(exc, REDIS_SERVER_STATE_ERRORS):
        return Fault.SINK_UNAVAILABLE, "broker_unavailable"
    return classify_redis_reply_error(str(exc))


def classify_redis_reply_error(message: str) -> tuple[Fault, str]:
    """(kind, reason) of an error reply to one XADD (or of a whole pipeline or script call)."""
    # redis-py prefixes a pipeline command's error with "Command # N (...) of pipeline caused error: ".
    message = message.rpartition(" of pipeline caused error: ")[2]
    # Redis 6 reports an error inside a script as "@user_script: 16: -OOM command not allowed...".
    if message.startswith("@user_script"):
        message = message.partition(": -")[2] or message
    prefix = message.lstrip("-").split(" ", 1)[0].upper()
    if prefix in REDIS_SERVER_STATES:
        return Fault.SINK_UNAVAILABLE, "broker_unavailable"
    return Fault.EVENT_REJECTED, "publish_failed"
