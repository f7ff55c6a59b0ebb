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
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from relay.config import validate_schema_name

try:
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - tracing is optional for applications
    _otel_propagate = None  # type: ignore[assignment]
    _otel_trace = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EnqueueResult",
    "OutboxEvent",
    "OutboxValidationError",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
]

DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
MAX_TOPIC_LENGTH = 249
JSON_CONTENT_TYPE = "application/json"

# One statement for one event or many: a single round trip whatever the batch size.
# WITH ORDINALITY + ORDER BY make ids follow input order by definition rather than by plan, which
# per-key delivery order depends on. CAST(... AS ...) rather than '::' because SQLAlchemy's text()
# would read '::' after a bind name as part of it. Headers travel as text[] so an application's
# custom jsonb codec (asyncpg set_type_codec) cannot re-encode them.
_INSERT_SQL = """
INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)
SELECT e.message_id, e.topic, e.key, e.payload, e.headers
FROM unnest(
    CAST({p[0]} AS uuid[]),
    CAST({p[1]} AS text[]),
    CAST({p[2]} AS text[]),
    CAST({p[3]} AS bytea[]),
    CAST(CAST({p[4]} AS text[]) AS jsonb[])
) WITH ORDINALITY AS e(message_id, topic, key, payload, headers, position)
ORDER BY e.position
ON CONFLICT (message_id) DO NOTHING
RETURNING id, message_id
"""

_PARAM_NAMES = ("message_ids", "topics", "keys", "payloads", "headers")
_ASYNCPG_PLACEHOLDERS = ("$1", "$2", "$3", "$4", "$5")
_PSYCOPG_PLACEHOLDERS = ("%s",) * 5
_SQLALCHEMY_PLACEHOLDERS = tuple(f":{name}" for name in _PARAM_NAMES)


class OutboxValidationError(ValueError):
    """An event was rejected before anything was sent to the database."""


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

    ``inserted`` is False when a row with this ``message_id`` already existed (or appeared earlier
    in the same `enqueue_many` call): nothing was written and ``id`` is None. Otherwise ``id`` is
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
    headers: str


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
    row ids (``EnqueueResult.id``). ``headers`` is a dict of str to str. When an OpenTelemetry span is active its context
    is added as ``traceparent`` (and ``tracestate``) unless you pass your own ``traceparent``.

    ``message_id`` (a UUID, or a str holding one) makes the call idempotent: if a row with that id
    already exists nothing is written and the result has ``inserted=False``. Without it a random
    UUID is generated and returned in the result.

    Raises `OutboxValidationError` (a ``ValueError``) for bad input before touching the database,
    and ``TypeError`` for a connection type it does not support.
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
    A ``message_id`` that appears more than once is written once: its first occurrence reports the
    outcome and the others ``inserted=False``. See `enqueue` for the meaning of each field.
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
    insert = _resolve(conn, _SYNC_DRIVERS, other=_ASYNC_DRIVERS, hint="aenqueue / aenqueue_many")
    table, rows = _prepare(schema, events, max_payload_bytes, indexed=indexed)
    if not rows:
        return []
    return _results(rows, insert(conn, table, _columns(rows)))


async def _awrite(
    conn: Any, events: Iterable[OutboxEvent], schema: str, max_payload_bytes: int, *, indexed: bool
) -> list[EnqueueResult]:
    insert = _resolve(conn, _ASYNC_DRIVERS, other=_SYNC_DRIVERS, hint="enqueue / enqueue_many")
    table, rows = _prepare(schema, events, max_payload_bytes, indexed=indexed)
    if not rows:
        return []
    return _results(rows, await insert(conn, table, _columns(rows)))


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


def _quoted_schema(schema: str) -> str:
    try:
        return f'"{validate_schema_name(schema)}"'
    except (ValueError, TypeError) as error:
        raise OutboxValidationError(str(error)) from None


def _validate(event: object, max_payload_bytes: int) -> _Row:
    if not isinstance(event, OutboxEvent):
        raise OutboxValidationError(f"expected an OutboxEvent, got {type(event).__name__}")
    payload, is_json = _encode_payload(event.payload, max_payload_bytes)
    headers = _check_headers(event.headers)
    if is_json and not _has_header(headers, "content-type"):
        headers["content-type"] = JSON_CONTENT_TYPE
    _add_trace_context(headers)
    return _Row(
        message_id=_check_message_id(event.message_id),
        topic=_check_topic(event.topic),
        key=_check_key(event.key),
        payload=payload,
        headers=json.dumps(headers, separators=(",", ":")),
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


def _check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise OutboxValidationError(f"key must be a str or None, got {type(key).__name__}")
    _check_text("key", key)
    return key


def _check_text(what: str, value: str) -> None:
    # PostgreSQL text and jsonb cannot hold NUL; better a clear error here than a driver error later.
    if "\x00" in value:
        raise OutboxValidationError(f"{what} must not contain NUL characters")


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
        data = _utf8(payload)
    elif payload is None:
        raise OutboxValidationError("payload is None: pass b'' for an empty payload, or a value for JSON")
    else:
        data, is_json = _json(payload), True
    if len(data) > limit:
        raise OutboxValidationError(f"payload is {len(data)} bytes; the limit (max_payload_bytes) is {limit}")
    return data, is_json


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise OutboxValidationError(f"payload str cannot be encoded as UTF-8: {error}") from error


def _json(value: object) -> bytes:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and consumers in other languages reject them.
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        raise OutboxValidationError(
            f"payload of type {type(value).__name__} cannot be JSON-encoded ({error}); "
            "pass bytes or str, or a JSON-serialisable value"
        ) from error


def _check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise OutboxValidationError(f"headers must be a dict of str to str, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise OutboxValidationError(
                f"headers must be a dict of str to str; header {name!r} has a "
                f"{type(name).__name__} name and a {type(value).__name__} value"
            )
        _check_text(f"header {name!r}", name + value)
    return dict(headers)


def _has_header(headers: Mapping[str, str], name: str) -> bool:
    return any(existing.lower() == name for existing in headers)


def _add_trace_context(headers: dict[str, str]) -> None:
    if _otel_trace is None or _has_header(headers, "traceparent"):
        return
    if not _otel_trace.get_current_span().get_span_context().is_valid:
        return
    carrier: dict[str, str] = {}
    _otel_propagate.inject(carrier)
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


def _columns(rows: list[_Row]) -> dict[str, list[Any]]:
    # Only the first occurrence of a message_id is sent, so the statement never conflicts with itself.
    first: dict[uuid.UUID, _Row] = {}
    for row in rows:
        first.setdefault(row.message_id, row)
    unique = list(first.values())
    # UUIDs go as text: every driver (even psycopg2 under SQLAlchemy) can send a str[].
    columns = (
        [str(row.message_id) for row in unique],
        [row.topic for row in unique],
        [row.key for row in unique],
        [row.payload for row in unique],
        [row.headers for row in unique],
    )
    # Positional drivers rely on this order, which is that of the placeholders in _INSERT_SQL.
    return dict(zip(_PARAM_NAMES, columns, strict=True))


def _results(rows: list[_Row], records: _Records) -> list[EnqueueResult]:
    # Drivers return their own UUID types (or str); normalise before matching.
    new_ids = {uuid.UUID(str(message_id)): int(row_id) for row_id, message_id in records}
    results = []
    for row in rows:
        # pop: a repeated message_id reports inserted=False after its first occurrence.
        row_id = new_ids.pop(row.message_id, None)
        results.append(EnqueueResult(message_id=row.message_id, inserted=row_id is not None, id=row_id))
    return results


@cache
def _sql(table: str, placeholders: tuple[str, ...]) -> str:
    return _INSERT_SQL.format(schema=table, p=placeholders)


# --- driver adapters ----------------------------------------------------------------------------


def _sqlalchemy_insert(conn: Any, table: str, params: dict[str, list[Any]]) -> _Records:
    from sqlalchemy import text

    return list(conn.execute(text(_sql(table, _SQLALCHEMY_PLACEHOLDERS)), params).all())


async def _sqlalchemy_ainsert(conn: Any, table: str, params: dict[str, list[Any]]) -> _Records:
    from sqlalchemy import text

    result = await conn.execute(text(_sql(table, _SQLALCHEMY_PLACEHOLDERS)), params)
    return list(result.all())


def _psycopg_insert(conn: Any, table: str, params: dict[str, list[Any]]) -> _Records:
    from psycopg.rows import tuple_row

    # tuple_row: the application may have set a dict row factory on its connection.
    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute(_sql(table, _PSYCOPG_PLACEHOLDERS), list(params.values()))
        return list(cursor.fetchall())


async def _psycopg_ainsert(conn: Any, table: str, params: dict[str, list[Any]]) -> _Records:
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_sql(table, _PSYCOPG_PLACEHOLDERS), list(params.values()))
        return list(await cursor.fetchall())


async def _asyncpg_insert(conn: Any, table: str, params: dict[str, list[Any]]) -> _Records:
    return list(await conn.fetch(_sql(table, _ASYNCPG_PLACEHOLDERS), *params.values()))


_Driver = tuple[str, str, Callable[..., Any]]

# (module, class, adapter). Only modules the application already imported are consulted: an object
# of a class implies its module is loaded, and so no optional library is ever imported here.
_SYNC_DRIVERS: tuple[_Driver, ...] = (
    ("sqlalchemy.orm", "Session", _sqlalchemy_insert),
    ("sqlalchemy.engine", "Connection", _sqlalchemy_insert),
    ("psycopg", "Connection", _psycopg_insert),
)
_ASYNC_DRIVERS: tuple[_Driver, ...] = (
    ("sqlalchemy.ext.asyncio", "AsyncSession", _sqlalchemy_ainsert),
    ("sqlalchemy.ext.asyncio", "AsyncConnection", _sqlalchemy_ainsert),
    ("asyncpg", "Connection", _asyncpg_insert),
    ("psycopg", "AsyncConnection", _psycopg_ainsert),
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
