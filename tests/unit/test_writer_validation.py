"""The writer's validation and encoding, without a database: sessions here record statements instead."""

from __future__ import annotations

import asyncio
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
    OutboxConflictError,
    OutboxEvent,
    OutboxValidationError,
    OutboxWriterError,
    aenqueue,
    aenqueue_many,
    enqueue,
    enqueue_many,
)
from clients.writer import MAX_HEADER_COUNT, MAX_HEADER_NAME_BYTES, MAX_HEADERS_BYTES, MAX_KEY_BYTES

Record = tuple[str, int | None, list[str] | None]


class _Result:
    def __init__(self, rows: list[Record]) -> None:
        self._rows = rows

    def all(self) -> list[Record]:
        return self._rows


def _fake_insert(statement: Any, params: dict[str, Any], existing: dict[str, list[str]]) -> _Result:
    """Rows as the statements answer: (message_id, new id, None) for a new row, (message_id, None, the
    differing fields) for one that existed. One event (scalar parameters) goes by the plain INSERT,
    which returns nothing for a row that existed (the comparison follows, with arrays)."""
    message_ids = params["message_ids"]
    if not isinstance(message_ids, list):
        if message_ids in existing:
            return _Result([])
        message_ids = [message_ids]
    rows: list[Record] = []
    number = 0
    for mid in message_ids:
        if mid in existing:
            rows.append((mid, None, existing[mid]))
        else:
            number += 1
            rows.append((mid, number, None))
    return _Result(rows)


class RecordingSession(Session):
    """A real SQLAlchemy Session type that never reaches a database: it records each statement and
    answers as the INSERT would, treating `existing` message ids as already stored (with the fields
    in which the stored row differs from what is written)."""

    def __init__(self, existing: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, list[Any]]]] = []
        self.existing = existing or {}

    def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        self.calls.append((str(statement), params))
        return _fake_insert(statement, params, self.existing)


class RecordingAsyncSession(AsyncSession):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, list[Any]]]] = []

    async def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        self.calls.append((str(statement), params))
        return _fake_insert(statement, params, {})


@pytest.fixture
def session() -> Iterator[RecordingSession]:
    with RecordingSession() as s:
        yield s


def _sent(session: RecordingSession, column: str) -> list[Any]:
    assert len(session.calls) == 1, "expected exactly one statement"
    sent = session.calls[0][1][column]
    return sent if isinstance(sent, list) else [sent]  # one event: scalar parameters


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
        # Lone surrogates have no UTF-8 form; NUL does not fit in PostgreSQL text or jsonb.
        ({"topic": "or\ud800ders"}, "topic is not valid Unicode: lone surrogate '\\ud800' at index 2"),
        ({"key": "a\udc80"}, "key is not valid Unicode: lone surrogate '\\udc80' at index 1"),
        ({"key": "a\x00b"}, "key must not contain NUL characters"),
        ({"key": b"order-1"}, "key must be a str or None, got bytes"),
        ({"key": "k" * 1025}, "key is 1025 bytes in UTF-8; the limit is 1024"),
        ({"key": "é" * 513}, "key is 1026 bytes in UTF-8; the limit is 1024"),
        ({"headers": {"a\x00": "v"}}, "header name 'a\\x00' must not contain NUL characters"),
        ({"headers": {"a": "v\x00"}}, "header 'a' value must not contain NUL characters"),
        ({"headers": {"\ud800": "v"}}, "header name '\\ud800' is not valid Unicode: lone surrogate"),
        ({"headers": {"a": "\udfff"}}, "header 'a' value is not valid Unicode: lone surrogate '\\udfff'"),
        ({"headers": {"a": None}}, "header 'a' has a str name and a NoneType value"),
        ({"headers": {"a": b"v"}}, "header 'a' has a str name and a bytes value"),
        ({"headers": {b"a": "v"}}, "header b'a' has a bytes name and a str value"),
        ({"headers": "a=b"}, "headers must be a dict of str to str, got str"),
        ({"headers": {"n" * 257: "v"}}, "is 257 bytes in UTF-8; the limit is 256"),
        ({"headers": {f"h{n}": "v" for n in range(65)}}, "headers has 65 entries; the limit is 64"),
        ({"headers": {"big": "x" * 16_382}}, "headers are 16385 bytes (names and values"),
        (
            {"payload": {"s": "\ud800"}},
            "payload of type dict cannot be JSON-encoded: a string in it has a lone",
        ),
        ({"payload": {"\udc00": 1}}, "payload of type dict cannot be JSON-encoded"),
        ({"payload": ["ok", "\ud83d"]}, "lone surrogate '\\ud83d' at index 7 of the JSON text"),
        ({"schema": 42}, "schema must be a str, got int"),
        ({"schema": "outbox\n"}, "must be a lower-case SQL identifier"),
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


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        ("k" * MAX_KEY_BYTES, None),
        ("é" * (MAX_KEY_BYTES // 2), None),
        (None, {f"h{n}": "v" for n in range(MAX_HEADER_COUNT)}),
        (None, {"n" * MAX_HEADER_NAME_BYTES: "v"}),
        (None, {"big": "x" * (MAX_HEADERS_BYTES - 3)}),
    ],
)
def test_key_and_header_limits_are_inclusive(
    session: RecordingSession, key: str | None, headers: dict[str, str] | None
) -> None:
    enqueue(session, "orders", b"x", key=key, headers=headers)
    assert _sent(session, "keys") == [key]


def test_key_and_headers_count_toward_max_payload_bytes(session: RecordingSession) -> None:
    with pytest.raises(
        OutboxValidationError, match=_literal("event is 11 bytes (payload 10 + key 1 + headers 0)")
    ):
        enqueue(session, "orders", b"x" * 10, key="k", max_payload_bytes=10)
    with pytest.raises(
        OutboxValidationError, match=_literal("event is 10 bytes (payload 5 + key 0 + headers 5)")
    ):
        enqueue(session, "orders", b"x" * 5, headers={"ab": "cde"}, max_payload_bytes=9)
    # The content-type the writer adds for JSON counts too: 2 + len("content-type") + len("application/json").
    with pytest.raises(
        OutboxValidationError, match=_literal("event is 30 bytes (payload 2 + key 0 + headers 28)")
    ):
        enqueue(session, "orders", {}, max_payload_bytes=29)
    assert session.calls == []
    enqueue(session, "orders", {}, max_payload_bytes=30)
    assert len(session.calls) == 1


def test_headers_added_by_the_writer_count_toward_the_headers_limit(
    session: RecordingSession,
) -> None:
    headers = {"big": "x" * (MAX_HEADERS_BYTES - 3)}
    with pytest.raises(OutboxValidationError, match="those added by the writer included"):
        enqueue(session, "orders", {"id": 1}, headers=headers, max_payload_bytes=10**6)
    assert session.calls == []


def test_every_check_runs_before_the_database_for_every_driver_function() -> None:
    # The async functions validate before they await anything.
    async_session = RecordingAsyncSession()
    with pytest.raises(OutboxValidationError, match="key must not contain NUL"):
        asyncio.run(aenqueue(async_session, "orders", b"x", key="\x00"))
    with pytest.raises(OutboxValidationError, match=r"events\[1\]: header 'a' value is not valid Unicode"):
        asyncio.run(
            aenqueue_many(
                async_session, [OutboxEvent("orders", b"1"), OutboxEvent("o", b"2", headers={"a": "\ud800"})]
            )
        )
    assert async_session.calls == []


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
        # Non-ASCII text stays \u-escaped (stored bytes do not change with this version); NUL is fine
        # in a JSON payload (it is escaped, and the payload is bytea).
        ({"s": "é😀\x7f\x00"}, b'{"s":"\\u00e9\\ud83d\\ude00\\u007f\\u0000"}'),
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
    with RecordingSession(existing={str(given): []}) as session:
        result = enqueue(session, "orders", b"x", message_id=given)
    assert result == EnqueueResult(given, inserted=False, id=None)


def test_existing_message_id_with_other_content_is_a_conflict() -> None:
    given, fresh = uuid.uuid4(), uuid.uuid4()
    with (
        RecordingSession(existing={str(given): ["payload", "headers"]}) as session,
        pytest.raises(OutboxConflictError) as info,
    ):
        enqueue_many(
            session,
            [
                OutboxEvent("orders", b"new", message_id=fresh),
                OutboxEvent("orders", b"x", message_id=given),
            ],
        )
    error = info.value
    assert isinstance(error, OutboxWriterError) and not isinstance(error, OutboxValidationError)
    assert error.message_ids == (given,)
    assert error.conflicts == {given: ("payload", "headers")}
    assert str(error) == (
        f"message_id {given} is already in the outbox with a different payload and headers; "
        "reuse a message_id only to retry the same event"
    )


def test_duplicates_in_one_call_are_sent_once_and_reported_after_the_first(session: RecordingSession) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    events = [
        OutboxEvent("orders", b"1", message_id=a),
        OutboxEvent("orders", b"2", message_id=b),
        OutboxEvent("orders", b"1", message_id=str(a)),
    ]
    results = enqueue_many(session, events)
    assert _sent(session, "message_ids") == [str(a), str(b)]
    assert _sent(session, "payloads") == [b"1", b"2"]
    assert results == [EnqueueResult(a, True, 1), EnqueueResult(b, True, 2), EnqueueResult(a, False, None)]


@pytest.mark.parametrize(
    ("second", "fields"),
    [
        (OutboxEvent("orders", b"2"), ("payload",)),
        (OutboxEvent("payments", b"1", key="k"), ("topic", "key")),
        (OutboxEvent("orders", b"1", headers={"tenant": "b"}), ("headers",)),
        (OutboxEvent("orders", {"n": 1}), ("payload", "headers")),
    ],
)
def test_one_message_id_for_two_events_in_one_call_is_a_conflict_before_the_database(
    session: RecordingSession, second: OutboxEvent, fields: tuple[str, ...]
) -> None:
    a = uuid.uuid4()
    events = [
        OutboxEvent("orders", b"1", message_id=a, headers={"tenant": "a"} if "headers" in fields else None),
        OutboxEvent(second.topic, second.payload, key=second.key, headers=second.headers, message_id=a),
    ]
    with pytest.raises(OutboxConflictError, match=f"message_id {a} appears twice in this call") as info:
        enqueue_many(session, events)
    assert info.value.conflicts == {a: fields}
    assert session.calls == []


def test_trace_context_does_not_make_a_retry_a_conflict(session: RecordingSession) -> None:
    a = uuid.uuid4()
    events = [
        OutboxEvent(
            "orders", b"1", message_id=a, headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        ),
        OutboxEvent("orders", b"1", message_id=a, headers={"tracestate": "vendor=1"}),
    ]
    assert [r.inserted for r in enqueue_many(session, events)] == [True, False]


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
