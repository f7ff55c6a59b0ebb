"""How the sinks classify broker errors (issue 12): "the sink is unavailable" (nothing wrong with the
event: counts no attempt, never dead-letters) versus "this event failed" (retry / reject).

Built from the real client exception classes, the way the clients raise them: aiokafka's error
classes, and redis-py's own reply-error parser (which maps OOM, READONLY, LOADING... to its
exception subclasses and strips the error code from the message).

Written against `KafkaSink._classify`, `RedisSink._classify` (pipelined replies) and
`RedisSink._classify_scripted` (per-entry replies of the batch script); if the classifiers move
(e.g. to `relay/faults.py`), only the three `*_outcome` helpers below need to follow."""

from __future__ import annotations

import inspect
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    MessageSizeTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr
from redis._parsers import BaseParser
from redis.exceptions import ResponseError

from relay.config import RelaySettings
from relay.events import OutboxRow, Outcome, PublishResult
from relay.sinks.kafka import KafkaSink
from relay.sinks.redis import RedisSink

ROW = OutboxRow(
    id=1,
    message_id=uuid.uuid4(),
    topic="orders.created",
    key="order-1",
    payload=b"{}",
    headers={},
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
    attempts=0,
)


def settings() -> RelaySettings:
    return RelaySettings(
        database_url=SecretStr("postgresql://postgres@127.0.0.1:1/postgres"),
        kafka_bootstrap="127.0.0.1:1",  # never contacted: the sink is not started
        redis_url=SecretStr("redis://127.0.0.1:1/0"),
        unknown_topic_grace=0.0,  # an unknown-topic path, if taken, would reject at once
    )


def kafka_outcome(exc: BaseException) -> PublishResult:
    # `_classify(row, exc)` at the time of writing; `_classify(topic, exc)` in the rewrite.
    classify: Any = KafkaSink(settings())._classify
    first = next(iter(inspect.signature(classify).parameters))
    result: PublishResult = classify(ROW.topic if first == "topic" else ROW, exc)
    return result


def redis_pipelined_outcome(server_error: str) -> PublishResult:
    """A pipelined XADD's reply: redis-py turns the server's error line into this exception."""
    reply = BaseParser.parse_error(server_error)
    assert isinstance(reply, Exception)
    return RedisSink._classify(reply)


def redis_scripted_outcome(server_error: str) -> PublishResult:
    """The batch script's per-entry reply: '!' and the error of the XADD's redis.pcall."""
    return RedisSink._classify_scripted(b"!" + server_error.encode())


# -- Kafka ----------------------------------------------------------------------------------------

KAFKA_UNAVAILABLE = [
    TopicAuthorizationFailedError("orders.created"),
    TopicAuthorizationFailedError(),
    ClusterAuthorizationFailedError(),
    AuthenticationFailedError(),
    SaslAuthenticationFailed(),
]


@pytest.mark.parametrize("exc", KAFKA_UNAVAILABLE, ids=lambda e: type(e).__name__)
def test_kafka_authorization_and_authentication_failures_are_the_sink_being_unavailable(
    exc: BaseException,
) -> None:
    """Permissions are the broker's configuration, not the event's fault: fixing the ACL or the
    credentials must deliver every event, so none may be dead-lettered meanwhile."""
    result = kafka_outcome(exc)
    assert result.outcome is not Outcome.REJECT, f"{type(exc).__name__} must never dead-letter: {result}"
    assert result.outcome is Outcome.UNAVAILABLE, f"{type(exc).__name__}: {result}"


def test_kafka_still_rejects_a_record_that_is_too_large() -> None:
    """The other side of the line: the event's own fault is still archived at once."""
    assert kafka_outcome(MessageSizeTooLargeError()).outcome is Outcome.REJECT


# -- Redis ----------------------------------------------------------------------------------------

# What the servers send (Redis 6.2 / 7.x wording); none says anything about the event.
REDIS_SERVER_STATES = [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
    "Commands that may modify the data set are disabled, because this instance is configured to "
    "report errors during writes if RDB snapshotting fails (stop-writes-on-bgsave-error option).",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
]
EVENT_FAULTS = [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
]


def code(error: str) -> str:
    return error.split(" ", 1)[0]


@pytest.mark.parametrize("error", REDIS_SERVER_STATES, ids=code)
def test_redis_server_states_are_the_sink_being_unavailable_pipelined(error: str) -> None:
    result = redis_pipelined_outcome(error)
    assert result.outcome is Outcome.UNAVAILABLE, f"{code(error)} (OUTBOX_REDIS_SCRIPTS=false): {result}"


@pytest.mark.parametrize("error", REDIS_SERVER_STATES, ids=code)
def test_redis_server_states_are_the_sink_being_unavailable_scripted(error: str) -> None:
    result = redis_scripted_outcome(error)
    assert result.outcome is Outcome.UNAVAILABLE, f"{code(error)} (batch script): {result}"


def test_redis_6_scripted_oom_as_the_script_reports_it_is_the_sink_being_unavailable() -> None:
    """Redis 6.2 (the embedded server) refuses a write inside a script before running it and
    redis.pcall's error then carries the script position first; seen in
    test_sink_faults.py::test_redis_refusing_writes_dead_letters_nothing[scripted]. A classifier
    matching the error code only at the start of the text misses it."""
    reply = b"!@user_script: 16: -OOM command not allowed when used memory > 'maxmemory'.\r\n"
    result = RedisSink._classify_scripted(reply)
    assert result.outcome is Outcome.UNAVAILABLE, f"OOM (Redis 6.2 batch script): {result}"


@pytest.mark.parametrize("error", EVENT_FAULTS, ids=code)
@pytest.mark.parametrize("path", ["pipelined", "scripted"])
def test_a_redis_error_about_the_key_is_still_the_events_failure(error: str, path: str) -> None:
    """WRONGTYPE is about this stream key: retried with attempts counted (and, at the limit,
    dead-lettered), never waited out as an outage."""
    result = redis_pipelined_outcome(error) if path == "pipelined" else redis_scripted_outcome(error)
    assert result.outcome in (Outcome.RETRY, Outcome.REJECT), f"{code(error)} ({path}): {result}"
    assert "WRONGTYPE" in result.error, result


def test_redis_parser_really_produces_the_classes_the_relay_sees() -> None:
    """Guards the premise: redis-py strips the code of the errors it knows (the message alone no
    longer says OOM), and keeps the others as plain ResponseError with their text."""
    oom = BaseParser.parse_error(REDIS_SERVER_STATES[0])
    assert isinstance(oom, ResponseError) and not str(oom).startswith("OOM")
    busy = BaseParser.parse_error("BUSY Redis is busy running a script.")
    assert type(busy) is ResponseError and str(busy).startswith("BUSY")
