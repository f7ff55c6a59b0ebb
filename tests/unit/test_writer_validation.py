"""The writer's validation and encoding, without a database: sessions here record statements instead."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from clients import (
    EnqueueResult,
    OutboxEvent,
    OutboxValidationError,
    aenqueue,
    aenqueue_many,
    enqueue,
    enqueue_many,
)


class _Result:
    def __init__(self, rows: list[tuple[int, str]]) -> None:
        self._rows = rows

    def all(self) -> list[tuple[int, str]]:
        return self._rows


def _fake_insert(statement: Any, params: dict[str, list[Any]], existing: set[str]) -> _Result:
    new = [mid for mid in params["message_ids"] if mid not in existing]
    return _Result([(number, mid) for number, mid in enumerate(new, start=1)])


class RecordingSession(Session):
    """A real SQLAlchemy Session type that never reaches a database: it records each statement and
    answers as the INSERT would, treating `existing` message ids as already stored."""

    def __init__(self, existing: set[str] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, list[Any]]]] = []
        self.existing = existing or set()

    def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        self.calls.append((str(statement), params))
        return _fake_insert(statement, params, self.existing)


class RecordingAsyncSession(AsyncSession):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, list[Any]]]] = []

    async def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        self.calls.append((str(statement), params))
        return _fake_insert(statement, params, set())


@pytest.fixture
def session() -> Iterator[RecordingSession]:
    with RecordingSession() as s:
        yield s


def _sent(session: RecordingSession, column: str) -> list[Any]:
    assert len(session.calls) == 1, "expected exactly one statement"
    return session.calls[0][1][column]


def _headers_sent(session: RecordingSession) -> dict[str, str]:
    headers: dict[str, str] = json.loads(_sent(session, "headers")[0])
    return headers


# --- rejected input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topic": ""}, "topic must not be empty or blank"),
        ({"topic": "   "}, "topic must not be empty or blank"),
        ({"topic": None}, "topic must be a str, got NoneType"),
        ({"topic": "t" * 250}, "topic is 250 characters long; the limit is 249"),
        ({"topic": "a\x00b"}, "topic must not contain NUL"),
        ({"key": 42}, "key must be a str or None, got int"),
        ({"payload": None}, "payload is None"),
        ({"payload": object()}, "payload of type object cannot be JSON-encoded"),
        ({"payload": {1, 2}}, "payload of type set cannot be JSON-encoded"),
        ({"payload": {"at": datetime.datetime(2026, 1, 1)}}, "not JSON serializable"),
        ({"payload": {"x": float("nan")}}, "cannot be JSON-encoded"),
        ({"payload": "\ud800"}, "cannot be encoded as UTF-8"),
        ({"headers": [("a", "b")]}, "headers must be a dict of str to str, got list"),
        ({"headers": {"retries": 3}}, "header 'retries' has a str name and a int value"),
        ({"headers": {1: "x"}}, "header 1 has a int name"),
        ({"message_id": "not-a-uuid"}, "message_id 'not-a-uuid' is not a UUID"),
        ({"message_id": 123}, "message_id must be a uuid.UUID or a str, got int"),
        ({"schema": "Bad-Schema"}, "schema name 'Bad-Schema' must be a lower-case SQL identifier"),
        ({"schema": 'outbox"; DROP TABLE x; --'}, "must be a lower-case SQL identifier"),
        ({"max_payload_bytes": 0}, "max_payload_bytes must be a positive int"),
    ],
)
def test_bad_input_is_rejected_before_the_database(
    session: RecordingSession, kwargs: dict[str, Any], message: str
) -> None:
    call: dict[str, Any] = {"topic": "orders", "payload": b"{}", **kwargs}
    topic, payload = call.pop("topic"), call.pop("payload")
    with pytest.raises(OutboxValidationError, match=_literal(message)):
        enqueue(session, topic, payload, **call)
    assert session.calls == []


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(OutboxValidationError, ValueError)


def test_payload_over_the_limit_names_size_and_limit(session: RecordingSession) -> None:
    expected = r"payload is 11 bytes; the limit \(max_payload_bytes\) is 10"
    with pytest.raises(OutboxValidationError, match=expected):
        enqueue(session, "orders", b"x" * 11, max_payload_bytes=10)
    # The limit applies to the encoded bytes: "é" is two bytes in UTF-8.
    with pytest.raises(OutboxValidationError, match="payload is 12 bytes"):
        enqueue(session, "orders", "é" * 6, max_payload_bytes=10)
    assert session.calls == []


def test_limits_are_inclusive(session: RecordingSession) -> None:
    enqueue(session, "t" * 249, b"x" * 10, max_payload_bytes=10)
    assert _sent(session, "topics") == ["t" * 249]


def test_enqueue_many_validates_every_event_before_writing(session: RecordingSession) -> None:
    events = [OutboxEvent("orders", b"1"), OutboxEvent("orders", b"2"), OutboxEvent("", b"3")]
    with pytest.raises(OutboxValidationError, match=r"events\[2\]: topic must not be empty"):
        enqueue_many(session, events)
    assert session.calls == []


def test_enqueue_many_rejects_a_single_event_and_foreign_items(session: RecordingSession) -> None:
    with pytest.raises(OutboxValidationError, match="iterable of OutboxEvent, got OutboxEvent"):
        enqueue_many(session, OutboxEvent("orders", b"1"))  # type: ignore[arg-type]
    with pytest.raises(OutboxValidationError, match=r"events\[0\]: expected an OutboxEvent, got dict"):
        enqueue_many(session, [{"topic": "orders", "payload": b"1"}])  # type: ignore[list-item]


def test_enqueue_many_of_nothing_makes_no_round_trip(session: RecordingSession) -> None:
    assert enqueue_many(session, []) == []
    assert enqueue_many(session, iter(())) == []
    assert session.calls == []


# --- connections ------------------------------------------------------------------------------------


def test_unsupported_connection_names_the_supported_types() -> None:
    with pytest.raises(TypeError) as info:
        enqueue(object(), "orders", b"x")
    text = str(info.value)
    assert "unsupported connection type builtins.object" in text
    for name in ("sqlalchemy.orm.Session", "psycopg.Connection", "asyncpg.Connection", "AsyncSession"):
        assert name in text


async def test_sync_and_async_connections_point_to_the_other_function(session: RecordingSession) -> None:
    with pytest.raises(TypeError, match="use enqueue / enqueue_many instead"):
        await aenqueue(session, "orders", b"x")
    async_session = RecordingAsyncSession()
    with pytest.raises(TypeError, match="use aenqueue / aenqueue_many instead"):
        enqueue(async_session, "orders", b"x")


async def test_async_twins_write_the_same_statement(session: RecordingSession) -> None:
    async_session = RecordingAsyncSession()
    events = [OutboxEvent("orders", {"n": 1}, key="k", message_id=uuid.uuid4())]
    [async_result] = await aenqueue_many(async_session, events)
    [sync_result] = enqueue_many(session, events)
    assert async_result == sync_result
    assert async_session.calls == session.calls


def test_one_statement_in_the_quoted_schema(session: RecordingSession) -> None:
    enqueue_many(session, [OutboxEvent("orders", b"1"), OutboxEvent("orders", b"2")], schema="shop_outbox")
    [(sql, params)] = session.calls
    assert 'INSERT INTO "shop_outbox".outbox' in sql
    assert "ON CONFLICT (message_id) DO NOTHING" in sql
    assert set(params) == {"message_ids", "topics", "keys", "payloads", "headers"}


# --- encoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "stored"),
    [
        (b"\x00\xffraw", b"\x00\xffraw"),
        (bytearray(b"abc"), b"abc"),
        (memoryview(b"abcdef")[1:4], b"bcd"),
        ("héllo", "héllo".encode()),
        ("", b""),
    ],
)
def test_bytes_and_str_are_stored_as_they_are(
    session: RecordingSession, payload: object, stored: bytes
) -> None:
    enqueue(session, "orders", payload)
    assert _sent(session, "payloads") == [stored]
    assert "content-type" not in _headers_sent(session)


@pytest.mark.parametrize(
    ("payload", "stored"),
    [
        ({"id": 1, "items": ["a", "b"]}, b'{"id":1,"items":["a","b"]}'),
        ([1, 2.5, None], b"[1,2.5,null]"),
        (42, b"42"),
        (True, b"true"),
    ],
)
def test_other_values_are_compact_json(session: RecordingSession, payload: object, stored: bytes) -> None:
    enqueue(session, "orders", payload)
    assert _sent(session, "payloads") == [stored]
    assert _headers_sent(session) == {"content-type": "application/json"}


def test_caller_content_type_and_headers_are_kept(session: RecordingSession) -> None:
    headers = {"Content-Type": "application/vnd.shop+json", "tenant": "acme"}
    enqueue(session, "orders", {"id": 1}, headers=headers)
    assert _headers_sent(session) == headers
    assert headers == {"Content-Type": "application/vnd.shop+json", "tenant": "acme"}, "caller's dict mutated"


def test_topic_and_key_are_sent(session: RecordingSession) -> None:
    enqueue(session, "orders", b"x", key="order-1")
    assert _sent(session, "topics") == ["orders"]
    assert _sent(session, "keys") == ["order-1"]


# --- message ids ------------------------------------------------------------------------------------


def test_message_id_is_generated_client_side(session: RecordingSession) -> None:
    result = enqueue(session, "orders", b"x")
    assert isinstance(result.message_id, uuid.UUID)
    assert result.message_id.version == 4
    assert _sent(session, "message_ids") == [str(result.message_id)]
    assert result == EnqueueResult(message_id=result.message_id, inserted=True, id=1)


def test_message_id_may_be_a_uuid_or_a_str(session: RecordingSession) -> None:
    given = uuid.uuid4()
    assert enqueue(session, "orders", b"x", message_id=given).message_id == given
    assert enqueue(session, "orders", b"x", message_id=str(given).upper()).message_id == given


def test_existing_message_id_reports_not_inserted() -> None:
    given = uuid.uuid4()
    with RecordingSession(existing={str(given)}) as session:
        result = enqueue(session, "orders", b"x", message_id=given)
    assert result == EnqueueResult(given, inserted=False, id=None)


def test_duplicates_in_one_call_are_sent_once_and_reported_after_the_first(session: RecordingSession) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    events = [
        OutboxEvent("orders", b"1", message_id=a),
        OutboxEvent("orders", b"2", message_id=b),
        OutboxEvent("orders", b"3", message_id=str(a)),
    ]
    results = enqueue_many(session, events)
    assert _sent(session, "message_ids") == [str(a), str(b)]
    assert _sent(session, "payloads") == [b"1", b"2"]
    assert results == [EnqueueResult(a, True, 1), EnqueueResult(b, True, 2), EnqueueResult(a, False, None)]


# --- trace context ----------------------------------------------------------------------------------


@pytest.fixture
def tracer_provider() -> Iterator[TracerProvider]:
    # A local provider: spans it starts become current in the context without touching the global one.
    provider = TracerProvider()
    yield provider
    provider.shutdown()


def _traceparent(span: Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def test_no_trace_headers_without_an_active_span(session: RecordingSession) -> None:
    enqueue(session, "orders", b"x")
    assert _headers_sent(session) == {}


def test_active_span_is_injected_as_traceparent(
    session: RecordingSession, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer(__name__)
    with tracer.start_as_current_span("place-order") as span:
        enqueue_many(session, [OutboxEvent("orders", b"1"), OutboxEvent("orders", {"id": 2})])
    first, second = (json.loads(h) for h in _sent(session, "headers"))
    assert first["traceparent"] == _traceparent(span)
    assert second == {"traceparent": _traceparent(span), "content-type": "application/json"}


def test_caller_traceparent_is_not_overwritten(
    session: RecordingSession, tracer_provider: TracerProvider
) -> None:
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer_provider.get_tracer(__name__).start_as_current_span("place-order"):
        enqueue(session, "orders", b"x", headers={"traceparent": theirs, "tracestate": "vendor=1"})
    assert _headers_sent(session) == {"traceparent": theirs, "tracestate": "vendor=1"}
