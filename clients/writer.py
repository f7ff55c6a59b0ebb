"""Write events to the outbox inside your own database transaction.

The event becomes visible to the relay exactly when your transaction commits, and disappears with
it when it rolls back: these functions only INSERT through the connection you pass, and never
commit, roll back or open connections of their own.

    with Session(engine) as session, session.begin():
        session.add(order)
        enqueue(session, "orders", {"id": order.id}, key=f"order-{order.id}")

Supported connections: SQLAlchemy ``Session`` and ``Connection``, psycopg 3 ``Connection`` (with
``enqueue`` / ``enqueue_many``); SQLAlchemy ``AsyncSession`` and ``AsyncConnection``, asyncpg
``Connection`` (pool connections too) and psycopg 3 ``AsyncConnection`` (with ``aenqueue`` /
``aenqueue_many``). None of those libraries is imported here unless you use it.

A ``message_id`` identifies one event: writing it again with the same topic, key, payload and
headers is an idempotent no-op (``inserted=False``); writing it with different content raises
`OutboxConflictError`. Every input is checked before the database is touched (types, sizes, NUL
characters, lone surrogates): a bad one raises `OutboxValidationError`. Both derive from
`OutboxWriterError`.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_HEADERS_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_HEADER_NAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_TOPIC_LENGTH",
    "EnqueueResult",
    "OutboxConflictError",
    "OutboxEvent",
    "OutboxValidationError",
    "OutboxWriterError",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
]

# The size of an event: payload + key + every header name and value, in bytes (UTF-8). Kafka's default
# message limit (message.max.bytes, ~1 MiB) leaves room for the record overhead beyond this.
DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
MAX_TOPIC_LENGTH = 249  # characters: Kafka's limit, and the table's CHECK constraint
# Keys sit in btree indexes (outbox retries, dead letters) whose entries cannot exceed ~2.7 kB.
MAX_KEY_BYTES = 1024
MAX_HEADER_COUNT = 64  # the headers you pass; the writer may add content-type and trace context
MAX_HEADER_NAME_BYTES = 256
MAX_HEADERS_BYTES = 16_384  # all header names and values together, those the writer adds included
JSON_CONTENT_TYPE = "application/json"
# Trace context differs between attempts of one request: not part of what makes two events the same.
_PER_ATTEMPT_HEADERS = ("traceparent", "tracestate")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # as relay.shared.identifiers.validate_schema_name

# One statement for many events (enqueue_many): a single round trip whatever the batch size.
# WITH ORDINALITY + ORDER BY make ids follow input order by definition rather than by plan, which
# per-key delivery order depends on. CAST(... AS ...) rather than '::' because SQLAlchemy's text()
# would read '::' after a bind name as part of it. Headers travel as text[] so an application's
# custom jsonb codec (asyncpg set_type_codec) cannot re-encode them.
_EVENTS = """unnest(
    CAST({p[0]} AS uuid[]),
    CAST({p[1]} AS text[]),
    CAST({p[2]} AS text[]),
    CAST({p[3]} AS bytea[]),
    CAST(CAST({p[4]} AS text[]) AS jsonb[])
) WITH ORDINALITY AS e(message_id, topic, key, payload, headers, position)"""

# How the stored event o differs from the event e being written: the names of the differing fields,
# an empty array when they are the same event (trace context excluded, see _PER_ATTEMPT_HEADERS).
_DIFFERENCES = """array_remove(ARRAY[
    CASE WHEN o.topic <> e.topic THEN 'topic' END,
    CASE WHEN o.key IS DISTINCT FROM e.key THEN 'key' END,
    CASE WHEN o.payload <> e.payload THEN 'payload' END,
    CASE WHEN o.headers - ARRAY['traceparent', 'tracestate'] <> e.headers - ARRAY['traceparent', 'tracestate']
         THEN 'headers' END
], NULL)"""

# One row per distinct message_id, in input order: (message_id, new id or NULL, differences or NULL).
# For a message_id that already existed, the sub-select compares the stored row with the new event in
# the same round trip; it reads the statement's snapshot, which does not show a row that a concurrent
# transaction committed meanwhile (ON CONFLICT waited for it): then differences is NULL and
# _COMPARE_SQL, run as a new statement, sees it.
_INSERT_SQL = """
WITH e AS (
    SELECT * FROM {events}
),
inserted AS (
    INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)
    SELECT e.message_id, e.topic, e.key, e.payload, e.headers
    FROM e
    ORDER BY e.position
    ON CONFLICT (message_id) DO NOTHING
    RETURNING id, message_id
)
SELECT e.message_id, i.id,
       CASE WHEN i.id IS NULL THEN (
           SELECT {differences} FROM {schema}.outbox o WHERE o.message_id = e.message_id
       ) END AS differences
FROM e LEFT JOIN inserted i ON i.message_id = e.message_id
ORDER BY e.position
"""

# One event, the common case: a plain INSERT, about 1.6 times cheaper for Postgres than unnest() of
# one-element arrays (aenqueue rose from ~2.9k to ~4.5k commits/s on the bench machine, which at
# 2,000 commits/s is the difference between a saturated and a comfortable database). An existing
# message_id returns no row and is compared by _COMPARE_SQL in a second round trip: only retries
# pay for it.
_INSERT_ONE_SQL = """
INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)
VALUES (CAST({p[0]} AS uuid), CAST({p[1]} AS text), CAST({p[2]} AS text), CAST({p[3]} AS bytea),
        CAST(CAST({p[4]} AS text) AS jsonb))
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id, id, CAST(NULL AS text[]) AS differences
"""

_COMPARE_SQL = """
SELECT e.message_id, CAST(NULL AS bigint) AS id, {differences} AS differences
FROM {events} JOIN {schema}.outbox o ON o.message_id = e.message_id
ORDER BY e.position
"""

_PARAM_NAMES = ("message_ids", "topics", "keys", "payloads", "headers")
_ASYNCPG_PLACEHOLDERS = ("$1", "$2", "$3", "$4", "$5")
_PSYCOPG_PLACEHOLDERS = ("%s",) * 5
_SQLALCHEMY_PLACEHOLDERS = tuple(f":{name}" for name in _PARAM_NAMES)


class OutboxWriterError(Exception):
    """Base class of the errors the writer raises for an event it cannot write."""


class OutboxValidationError(OutboxWriterError, ValueError):
    """An event was rejected before anything was sent to the database."""


class OutboxConflictError(OutboxWriterError):
    """A ``message_id`` was written again with a different topic, key, payload or headers.

    A message_id identifies one event: repeating it with the same content is an idempotent retry,
    with other content it is a bug (two events sharing an id would be de-duplicated by consumers).
    ``conflicts`` maps each such message_id to the names of the fields that differ (``topic``,
    ``key``, ``payload``, ``headers``; the trace-context headers ``traceparent`` and ``tracestate``
    are not compared). ``message_ids`` lists them in input order.

    When the clash is within one `enqueue_many` call, nothing was sent. When the stored row is the
    other side, the statement has run: the events of the call that did not conflict were inserted in
    your transaction, as by a call without them. Roll back, or commit them knowingly.
    """

    def __init__(self, conflicts: Mapping[uuid.UUID, Sequence[str]], *, within_call: bool = False) -> None:
        self.conflicts: dict[uuid.UUID, tuple[str, ...]] = {mid: tuple(f) for mid, f in conflicts.items()}
        self.message_ids: tuple[uuid.UUID, ...] = tuple(self.conflicts)
        first, fields = next(iter(self.conflicts.items()))
        where = "appears twice in this call" if within_call else "is already in the outbox"
        text = f"message_id {first} {where} with a different {' and '.join(fields)}"
        if len(self.conflicts) > 1:
            text += f" (and {len(self.conflicts) - 1} more message_ids conflict)"
        super().__init__(text + "; reuse a message_id only to retry the same event")


@dataclass(frozen=True)
class OutboxEvent:
    """One event for `enqueue_many`; the fields mean what the arguments of `enqueue` mean."""

    topic: str
    payload: object
    key: str | None = None
    headers: Mapping[str, str] | None = None
    message_id: uuid.UUID | str | None = None


@dataclass(frozen=True)
class EnqueueResult:
    """What happened to one event.

    ``inserted`` is False when this event (same ``message_id``, topic, key, payload and headers)
    already existed, or appeared earlier in the same `enqueue_many` call: nothing was written and
    ``id`` is None. (Other content under an existing message_id raises `OutboxConflictError`.) Otherwise ``id`` is
    the new row's id, which orders events for the relay.
    """

    message_id: uuid.UUID
    inserted: bool
    id: int | None


@dataclass(frozen=True)
class _Row:
    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: str  # compact JSON
    compared_headers: dict[str, str]  # the headers that identify the event (no trace context)


_Records = Sequence[Sequence[Any]]


# --- public API ---------------------------------------------------------------------------------


def enqueue(
    conn: Any,
    topic: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: uuid.UUID | str | None = None,
    schema: str = "outbox",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> EnqueueResult:
    """Insert one event into ``<schema>.outbox`` through ``conn``, inside its current transaction.

    ``conn`` is a SQLAlchemy ``Session`` or ``Connection``, or a psycopg 3 ``Connection``; for async
    connections use `aenqueue`. Nothing is committed: the event is published only if and when your
    transaction commits.

    ``payload``: ``bytes``/``bytearray``/``memoryview`` are stored as they are, ``str`` as UTF-8,
    anything else as compact JSON (and ``headers`` then get ``content-type: application/json``
    unless you set one). ``None`` is rejected: pass ``b""`` for an empty payload.

    ``key`` orders events: those with the same topic and key are delivered in the order of their
    row ids (``EnqueueResult.id``); at most `MAX_KEY_BYTES` (1024) bytes in UTF-8. ``headers`` is a
    dict of str to str: at most `MAX_HEADER_COUNT` (64) entries, names of at most
    `MAX_HEADER_NAME_BYTES` (256) bytes, and `MAX_HEADERS_BYTES` (16 KiB) of names and values in
    all. When an OpenTelemetry span is active its context is added as ``traceparent`` (and
    ``tracestate``) unless you pass your own ``traceparent``.

    ``max_payload_bytes`` bounds the whole event: payload + key + header names and values (the
    headers added here included), in bytes.

    ``message_id`` (a UUID, or a str holding one) makes the call idempotent: if a row with that id
    already exists with the same topic, key, payload and headers (``traceparent``/``tracestate``
    aside), nothing is written and the result has ``inserted=False``; if it exists with different
    content, `OutboxConflictError` is raised. Without it a random UUID is generated and returned in
    the result. A new event takes one round trip, one plain INSERT; a ``message_id`` that already
    exists takes a second one, which compares the stored row.

    Raises `OutboxValidationError` (a ``ValueError``) for bad input before touching the database:
    wrong types, empty or over-long topic, sizes over the limits above, NUL characters in the
    topic, key or headers (PostgreSQL text cannot hold them), lone surrogates in any string
    (they have no UTF-8 encoding), an invalid UUID or schema name. Raises `OutboxConflictError` as
    above, and ``TypeError`` for a connection type it does not support. Both errors derive from
    `OutboxWriterError`. Database errors are the driver's own.
    """
    event = OutboxEvent(topic, payload, key=key, headers=headers, message_id=message_id)
    return _write(conn, [event], schema, max_payload_bytes, indexed=False)[0]


def enqueue_many(
    conn: Any,
    events: Iterable[OutboxEvent],
    *,
    schema: str = "outbox",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[EnqueueResult]:
    """Insert many events in one statement through ``conn``, inside its current transaction.

    Every event is validated first, so one bad event means none is sent. Results are in input order
    and the new rows' ids follow input order too. An empty ``events`` does not touch the database.
    A ``message_id`` that appears more than once with the same content is written once: its first
    occurrence reports the outcome and the others ``inserted=False``; with different content it
    raises `OutboxConflictError` before anything is sent. A ``message_id`` already stored with
    different content raises `OutboxConflictError` after the statement ran, the other events of the
    call having been inserted (see its docstring). See `enqueue` for the meaning of each field.
    """
    return _write(conn, events, schema, max_payload_bytes, indexed=True)


async def aenqueue(
    conn: Any,
    topic: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: uuid.UUID | str | None = None,
    schema: str = "outbox",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> EnqueueResult:
    """`enqueue` for async connections: a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, an
    asyncpg ``Connection`` (a pool connection too) or a psycopg 3 ``AsyncConnection``."""
    event = OutboxEvent(topic, payload, key=key, headers=headers, message_id=message_id)
    return (await _awrite(conn, [event], schema, max_payload_bytes, indexed=False))[0]


async def aenqueue_many(
    conn: Any,
    events: Iterable[OutboxEvent],
    *,
    schema: str = "outbox",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[EnqueueResult]:
    """`enqueue_many` for async connections (see `aenqueue` for which)."""
    return await _awrite(conn, events, schema, max_payload_bytes, indexed=True)


def _write(
    conn: Any, events: Iterable[OutboxEvent], schema: str, max_payload_bytes: int, *, indexed: bool
) -> list[EnqueueResult]:
    run = _resolve(conn, _SYNC_DRIVERS, other=_ASYNC_DRIVERS, hint="aenqueue / aenqueue_many")
    table, rows = _prepare(schema, events, max_payload_bytes, indexed=indexed)
    if not rows:
        return []
    unique = _unique(rows)
    statement, params = _insert(unique)
    outcome = _Outcome(run(conn, statement, table, params), unique)
    if outcome.unseen:
        outcome.compared(run(conn, _COMPARE_SQL, table, _columns(outcome.rows(unique))))
    return outcome.results(rows)


async def _awrite(
    conn: Any, events: Iterable[OutboxEvent], schema: str, max_payload_bytes: int, *, indexed: bool
) -> list[EnqueueResult]:
    run = _resolve(conn, _ASYNC_DRIVERS, other=_SYNC_DRIVERS, hint="enqueue / enqueue_many")
    table, rows = _prepare(schema, events, max_payload_bytes, indexed=indexed)
    if not rows:
        return []
    unique = _unique(rows)
    statement, params = _insert(unique)
    outcome = _Outcome(await run(conn, statement, table, params), unique)
    if outcome.unseen:
        outcome.compared(await run(conn, _COMPARE_SQL, table, _columns(outcome.rows(unique))))
    return outcome.results(rows)


# --- validation and encoding --------------------------------------------------------------------


def _prepare(
    schema: str, events: Iterable[OutboxEvent], max_payload_bytes: int, *, indexed: bool
) -> tuple[str, list[_Row]]:
    """The quoted schema and the validated rows; raises OutboxValidationError on any bad input."""
    table = _quoted_schema(schema)
    if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
        raise OutboxValidationError(f"max_payload_bytes must be a positive int, got {max_payload_bytes!r}")
    if isinstance(events, OutboxEvent | str | bytes | Mapping):
        raise OutboxValidationError(f"events must be an iterable of OutboxEvent, got {type(events).__name__}")
    rows = []
    for index, event in enumerate(events):
        try:
            rows.append(_validate(event, max_payload_bytes))
        except OutboxValidationError as error:
            if not indexed:
                raise
            raise OutboxValidationError(f"events[{index}]: {error}") from error
    return table, rows


def _quoted_schema(schema: object) -> str:
    if not isinstance(schema, str):
        raise OutboxValidationError(f"schema must be a str, got {type(schema).__name__}")
    if not _SCHEMA_NAME.fullmatch(schema):
        raise OutboxValidationError(
            f"schema name {schema!r} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)"
        )
    return f'"{schema}"'


def _validate(event: object, max_payload_bytes: int) -> _Row:
    if not isinstance(event, OutboxEvent):
        raise OutboxValidationError(f"expected an OutboxEvent, got {type(event).__name__}")
    message_id = _check_message_id(event.message_id)
    topic = _check_topic(event.topic)
    key, key_size = _check_key(event.key)
    payload, is_json = _encode_payload(event.payload, max_payload_bytes)
    headers = _check_headers(event.headers)
    compared_headers = {name: value for name, value in headers.items() if name not in _PER_ATTEMPT_HEADERS}
    if is_json and not _has_header(headers, "content-type"):
        headers["content-type"] = JSON_CONTENT_TYPE
        compared_headers["content-type"] = JSON_CONTENT_TYPE
    _add_trace_context(headers)
    headers_size = sum(len(_utf8(name)) + len(_utf8(value)) for name, value in headers.items())
    if headers_size > MAX_HEADERS_BYTES:
        raise OutboxValidationError(
            f"headers are {headers_size} bytes (names and values, those added by the writer included); "
            f"the limit is {MAX_HEADERS_BYTES}"
        )
    size = len(payload) + key_size + headers_size
    if size > max_payload_bytes:
        raise OutboxValidationError(
            f"event is {size} bytes (payload {len(payload)} + key {key_size} + headers {headers_size}); "
            f"the limit (max_payload_bytes) is {max_payload_bytes}"
        )
    return _Row(
        message_id=message_id,
        topic=topic,
        key=key,
        payload=payload,
        headers=json.dumps(headers, separators=(",", ":")),
        compared_headers=compared_headers,
    )


def _check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise OutboxValidationError(f"topic must be a str, got {type(topic).__name__}")
    if not topic.strip():
        raise OutboxValidationError("topic must not be empty or blank")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise OutboxValidationError(f"topic is {len(topic)} characters long; the limit is {MAX_TOPIC_LENGTH}")
    _check_text("topic", topic)
    return topic


def _check_key(key: object) -> tuple[str | None, int]:
    """The key and its size in bytes."""
    if key is None:
        return None, 0
    if not isinstance(key, str):
        raise OutboxValidationError(f"key must be a str or None, got {type(key).__name__}")
    size = _check_text("key", key)
    if size > MAX_KEY_BYTES:
        raise OutboxValidationError(f"key is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES}")
    return key, size


def _check_text(what: str, value: str) -> int:
    """The UTF-8 size of a string bound for a PostgreSQL text or jsonb value, which must be valid."""
    # PostgreSQL text and jsonb cannot hold NUL; better a clear error here than a driver error later.
    if "\x00" in value:
        raise OutboxValidationError(f"{what} must not contain NUL characters")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise OutboxValidationError(f"{what} is not valid Unicode: {_surrogate(error)}") from None


def _surrogate(error: UnicodeEncodeError) -> str:
    return f"lone surrogate {error.object[error.start]!r} at index {error.start}"


def _encode_payload(payload: object, limit: int) -> tuple[bytes, bool]:
    """The payload as stored, and whether it was JSON-encoded here."""
    is_json = False
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, bytearray):
        data = bytes(payload)
    elif isinstance(payload, memoryview):
        data = payload.tobytes()
    elif isinstance(payload, str):
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError as error:
            raise OutboxValidationError(
                f"payload str cannot be encoded as UTF-8: {_surrogate(error)}"
            ) from None
    elif payload is None:
        raise OutboxValidationError("payload is None: pass b'' for an empty payload, or a value for JSON")
    else:
        data, is_json = _json(payload), True
    if len(data) > limit:
        raise OutboxValidationError(f"payload is {len(data)} bytes; the limit (max_payload_bytes) is {limit}")
    return data, is_json


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")  # only for strings _check_text or _json accepted


def _json(value: object) -> bytes:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and consumers in other languages reject them.
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise OutboxValidationError(
            f"payload of type {type(value).__name__} cannot be JSON-encoded ({error}); "
            "pass bytes or str, or a JSON-serialisable value"
        ) from error
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        # ensure_ascii would write it as a \udXXX escape, which JSON parsers reject or mangle.
        raise OutboxValidationError(
            f"payload of type {type(value).__name__} cannot be JSON-encoded: a string in it has a "
            f"{_surrogate(error)} of the JSON text"
        ) from None
    if text.isascii() and "\x7f" not in text:
        return data  # what ensure_ascii=True writes too
    # Non-ASCII text is stored \u-escaped, as always, so that a retry compares equal to older rows.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


def _check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise OutboxValidationError(f"headers must be a dict of str to str, got {type(headers).__name__}")
    if len(headers) > MAX_HEADER_COUNT:
        raise OutboxValidationError(f"headers has {len(headers)} entries; the limit is {MAX_HEADER_COUNT}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise OutboxValidationError(
                f"headers must be a dict of str to str; header {name!r} has a "
                f"{type(name).__name__} name and a {type(value).__name__} value"
            )
        size = _check_text(f"header name {name!r}", name)
        if size > MAX_HEADER_NAME_BYTES:
            raise OutboxValidationError(
                f"header name {name[:40]!r}... is {size} bytes in UTF-8; the limit is {MAX_HEADER_NAME_BYTES}"
            )
        _check_text(f"header {name!r} value", value)
    return dict(headers)


def _has_header(headers: Mapping[str, str], name: str) -> bool:
    return any(existing.lower() == name for existing in headers)


def _add_trace_context(headers: dict[str, str]) -> None:
    # OpenTelemetry is consulted only when the application imported it: without it there is no current
    # span to continue, and importing the writer stays standard-library only.
    otel_trace = sys.modules.get("opentelemetry.trace")
    if otel_trace is None or _has_header(headers, "traceparent"):
        return
    if not otel_trace.get_current_span().get_span_context().is_valid:
        return
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for name, value in carrier.items():
        headers.setdefault(name, value)


def _check_message_id(message_id: object) -> uuid.UUID:
    if message_id is None:
        return uuid.uuid4()
    if isinstance(message_id, uuid.UUID):
        return message_id
    if isinstance(message_id, str):
        try:
            return uuid.UUID(message_id)
        except ValueError:
            raise OutboxValidationError(f"message_id {message_id!r} is not a UUID") from None
    raise OutboxValidationError(f"message_id must be a uuid.UUID or a str, got {type(message_id).__name__}")


# --- statement parameters and results -----------------------------------------------------------


def _unique(rows: list[_Row]) -> list[_Row]:
    """The first occurrence of each message_id, so that the statement never conflicts with itself;
    raises OutboxConflictError when a later occurrence is a different event."""
    first: dict[uuid.UUID, _Row] = {}
    conflicts: dict[uuid.UUID, tuple[str, ...]] = {}
    for row in rows:
        earlier = first.setdefault(row.message_id, row)
        differences = _differences(earlier, row)
        if differences and row.message_id not in conflicts:
            conflicts[row.message_id] = differences
    if conflicts:
        raise OutboxConflictError(conflicts, within_call=True)
    return list(first.values())


def _differences(a: _Row, b: _Row) -> tuple[str, ...]:
    # The fields _DIFFERENCES compares in SQL, in the same order.
    same = (
        a.topic == b.topic,
        a.key == b.key,
        a.payload == b.payload,
        a.compared_headers == b.compared_headers,
    )
    return tuple(
        name for name, equal in zip(("topic", "key", "payload", "headers"), same, strict=True) if not equal
    )


def _insert(unique: list[_Row]) -> tuple[str, dict[str, Any]]:
    """The INSERT statement for these distinct events and its parameters."""
    columns = _columns(unique)
    if len(unique) == 1:
        return _INSERT_ONE_SQL, {name: values[0] for name, values in columns.items()}
    return _INSERT_SQL, columns


def _columns(rows: list[_Row]) -> dict[str, list[Any]]:
    # UUIDs go as text: every driver (even psycopg2 under SQLAlchemy) can send a str[].
    columns = (
        [str(row.message_id) for row in rows],
        [row.topic for row in rows],
        [row.key for row in rows],
        [row.payload for row in rows],
        [row.headers for row in rows],
    )
    # Positional drivers rely on this order, which is that of the placeholders in _EVENTS.
    return dict(zip(_PARAM_NAMES, columns, strict=True))


class _Outcome:
    """What the statements said about each distinct message_id."""

    def __init__(self, records: _Records, unique: list[_Row]) -> None:
        self.ids: dict[uuid.UUID, int] = {}  # inserted, with the new row's id
        self.differences: dict[uuid.UUID, tuple[str, ...]] = {}  # existed: () when the same event
        # existed, but not compared yet: committed after the statement's snapshot, or not returned at
        # all (_INSERT_ONE_SQL returns only what it inserted)
        self.unseen: set[uuid.UUID] = {row.message_id for row in unique}
        for message_id, row_id, differences in records:
            # Drivers return their own UUID types (or str); normalise before matching.
            key = uuid.UUID(str(message_id))
            if row_id is not None:
                self.ids[key] = int(row_id)
                self.unseen.discard(key)
            elif differences is not None:
                self.differences[key] = tuple(differences)
                self.unseen.discard(key)

    def rows(self, unique: list[_Row]) -> list[_Row]:
        """The rows to compare again, in a statement that sees what was committed meanwhile."""
        return [row for row in unique if row.message_id in self.unseen]

    def compared(self, records: _Records) -> None:
        for message_id, _, differences in records:
            self.differences[uuid.UUID(str(message_id))] = tuple(differences)
        # A row still unseen was deleted (published) since: nothing left to compare; a duplicate.
        self.unseen.clear()

    def results(self, rows: list[_Row]) -> list[EnqueueResult]:
        conflicts = {mid: fields for mid, fields in self.differences.items() if fields}
        if conflicts:
            ordered = {
                row.message_id: conflicts[row.message_id] for row in rows if row.message_id in conflicts
            }
            raise OutboxConflictError(ordered)
        results = []
        for row in rows:
            # pop: a repeated message_id reports inserted=False after its first occurrence.
            row_id = self.ids.pop(row.message_id, None)
            results.append(EnqueueResult(message_id=row.message_id, inserted=row_id is not None, id=row_id))
        return results


@cache
def _sql(statement: str, table: str, placeholders: tuple[str, ...]) -> str:
    events = _EVENTS.format(p=placeholders)
    return statement.format(schema=table, events=events, differences=_DIFFERENCES, p=placeholders)


# --- driver adapters ----------------------------------------------------------------------------
# Each runs one statement (_INSERT_ONE_SQL, _INSERT_SQL or _COMPARE_SQL) with its driver's placeholders and returns
# its rows as tuples.


def _sqlalchemy_run(conn: Any, statement: str, table: str, params: dict[str, Any]) -> _Records:
    from sqlalchemy import text

    return list(conn.execute(text(_sql(statement, table, _SQLALCHEMY_PLACEHOLDERS)), params).all())


async def _sqlalchemy_arun(conn: Any, statement: str, table: str, params: dict[str, Any]) -> _Records:
    from sqlalchemy import text

    result = await conn.execute(text(_sql(statement, table, _SQLALCHEMY_PLACEHOLDERS)), params)
    return list(result.all())


def _psycopg_run(conn: Any, statement: str, table: str, params: dict[str, Any]) -> _Records:
    from psycopg.rows import tuple_row

    # tuple_row: the application may have set a dict row factory on its connection.
    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute(_sql(statement, table, _PSYCOPG_PLACEHOLDERS), list(params.values()))
        return list(cursor.fetchall())


async def _psycopg_arun(conn: Any, statement: str, table: str, params: dict[str, Any]) -> _Records:
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_sql(statement, table, _PSYCOPG_PLACEHOLDERS), list(params.values()))
        return list(await cursor.fetchall())


async def _asyncpg_run(conn: Any, statement: str, table: str, params: dict[str, Any]) -> _Records:
    return list(await conn.fetch(_sql(statement, table, _ASYNCPG_PLACEHOLDERS), *params.values()))


_Driver = tuple[str, str, Callable[..., Any]]

# (module, class, adapter). Only modules the application already imported are consulted: an object
# of a class implies its module is loaded, and so no optional library is ever imported here.
_SYNC_DRIVERS: tuple[_Driver, ...] = (
    ("sqlalchemy.orm", "Session", _sqlalchemy_run),
    ("sqlalchemy.engine", "Connection", _sqlalchemy_run),
    ("psycopg", "Connection", _psycopg_run),
)
_ASYNC_DRIVERS: tuple[_Driver, ...] = (
    ("sqlalchemy.ext.asyncio", "AsyncSession", _sqlalchemy_arun),
    ("sqlalchemy.ext.asyncio", "AsyncConnection", _sqlalchemy_arun),
    ("asyncpg", "Connection", _asyncpg_run),
    ("psycopg", "AsyncConnection", _psycopg_arun),
)


def _match(conn: object, drivers: tuple[_Driver, ...]) -> Callable[..., Any] | None:
    for module_name, class_name, adapter in drivers:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(conn, cls):
            return adapter
    return None


def _resolve(conn: object, drivers: tuple[_Driver, ...], *, other: tuple[_Driver, ...], hint: str) -> Any:
    adapter = _match(conn, drivers)
    if adapter is not None:
        return adapter
    kind = f"{type(conn).__module__}.{type(conn).__qualname__}"
    if _match(conn, other) is not None:
        raise TypeError(f"{kind} is not supported by this function; use {hint} instead")
    raise TypeError(
        f"unsupported connection type {kind}. Pass the connection or session of your transaction: "
        f"{_names(drivers)} (or, with {hint}: {_names(other)})"
    )


def _names(drivers: tuple[_Driver, ...]) -> str:
    return ", ".join(f"{module}.{cls}" for module, cls, _ in drivers)
