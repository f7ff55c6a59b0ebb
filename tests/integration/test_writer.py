"""The writer against real PostgreSQL, through every supported driver, inside the caller's transaction;
and the plain-SQL contract other languages rely on: an INSERT that fires a notification on commit."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from clients import (
    EnqueueResult,
    OutboxConflictError,
    OutboxEvent,
    aenqueue,
    aenqueue_many,
    enqueue,
    enqueue_many,
)
from relay.shared.dburl import sqlalchemy_url

NOTIFY_TIMEOUT = 5.0


@dataclass
class Writer:
    """The writer API over one open transaction, awaitable whether the driver is sync or async."""

    conn: Any
    schema: str
    is_async: bool

    async def enqueue(self, topic: str, payload: object, **kwargs: Any) -> EnqueueResult:
        if self.is_async:
            return await aenqueue(self.conn, topic, payload, schema=self.schema, **kwargs)
        return enqueue(self.conn, topic, payload, schema=self.schema, **kwargs)

    async def enqueue_many(self, events: list[OutboxEvent]) -> list[EnqueueResult]:
        if self.is_async:
            return await aenqueue_many(self.conn, events, schema=self.schema)
        return enqueue_many(self.conn, events, schema=self.schema)


# A driver opens a transaction for a schema, yields a Writer on it, then commits or rolls back.
Transaction = Callable[[str, bool], AbstractAsyncContextManager[Writer]]


@asynccontextmanager
async def _sqlalchemy_session(engine: Engine, schema: str, commit: bool) -> AsyncIterator[Writer]:
    with Session(engine) as session:
        yield Writer(session, schema, is_async=False)
        session.commit() if commit else session.rollback()


@asynccontextmanager
async def _sqlalchemy_connection(engine: Engine, schema: str, commit: bool) -> AsyncIterator[Writer]:
    with engine.connect() as conn:
        yield Writer(conn, schema, is_async=False)
        conn.commit() if commit else conn.rollback()


@asynccontextmanager
async def _sqlalchemy_async_session(engine: AsyncEngine, schema: str, commit: bool) -> AsyncIterator[Writer]:
    async with AsyncSession(engine) as session:
        yield Writer(session, schema, is_async=True)
        await (session.commit() if commit else session.rollback())


@asynccontextmanager
async def _sqlalchemy_async_connection(
    engine: AsyncEngine, schema: str, commit: bool
) -> AsyncIterator[Writer]:
    async with engine.connect() as conn:
        yield Writer(conn, schema, is_async=True)
        await (conn.commit() if commit else conn.rollback())


@asynccontextmanager
async def _asyncpg(conn: asyncpg.Connection, schema: str, commit: bool) -> AsyncIterator[Writer]:
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield Writer(conn, schema, is_async=True)
    except BaseException:
        await transaction.rollback()  # a failed test must not leave the shared connection in a transaction
        raise
    await (transaction.commit() if commit else transaction.rollback())


@asynccontextmanager
async def _asyncpg_pool(pool: asyncpg.Pool, schema: str, commit: bool) -> AsyncIterator[Writer]:
    async with pool.acquire() as conn, _asyncpg(conn, schema, commit) as writer:
        yield writer


@asynccontextmanager
async def _psycopg(conn: psycopg.Connection[Any], schema: str, commit: bool) -> AsyncIterator[Writer]:
    try:
        yield Writer(conn, schema, is_async=False)
    except BaseException:
        conn.rollback()
        raise
    conn.commit() if commit else conn.rollback()


@asynccontextmanager
async def _psycopg_async(
    conn: psycopg.AsyncConnection[Any], schema: str, commit: bool
) -> AsyncIterator[Writer]:
    try:
        yield Writer(conn, schema, is_async=True)
    except BaseException:
        await conn.rollback()
        raise
    await (conn.commit() if commit else conn.rollback())


@asynccontextmanager
async def _open_driver(name: str, url: str) -> AsyncIterator[Transaction]:
    """The named driver's transaction factory, with its engine, pool or connection open meanwhile."""
    if name in ("sqlalchemy_session", "sqlalchemy_connection"):
        engine = create_engine(sqlalchemy_url(url, "psycopg"))
        sync_factory = _sqlalchemy_session if name == "sqlalchemy_session" else _sqlalchemy_connection
        yield lambda schema, commit: sync_factory(engine, schema, commit)
        engine.dispose()
    elif name in ("sqlalchemy_async_session", "sqlalchemy_async_connection"):
        async_engine = create_async_engine(sqlalchemy_url(url, "asyncpg"))
        async_factory = (
            _sqlalchemy_async_session if name == "sqlalchemy_async_session" else _sqlalchemy_async_connection
        )
        yield lambda schema, commit: async_factory(async_engine, schema, commit)
        await async_engine.dispose()
    elif name == "asyncpg":
        conn = await asyncpg.connect(url)
        yield lambda schema, commit: _asyncpg(conn, schema, commit)
        await conn.close()
    elif name == "asyncpg_pool":
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
            yield lambda schema, commit: _asyncpg_pool(pool, schema, commit)
    elif name == "psycopg":
        with psycopg.connect(url) as sync_conn:
            yield lambda schema, commit: _psycopg(sync_conn, schema, commit)
    elif name == "psycopg_async":
        async with await psycopg.AsyncConnection.connect(url) as async_conn:
            yield lambda schema, commit: _psycopg_async(async_conn, schema, commit)
    else:
        raise AssertionError(name)


DRIVERS = [
    "sqlalchemy_session",
    "sqlalchemy_connection",
    "sqlalchemy_async_session",
    "sqlalchemy_async_connection",
    "asyncpg",
    "asyncpg_pool",
    "psycopg",
    "psycopg_async",
]


@pytest.fixture(params=DRIVERS)
async def transaction(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Transaction]:
    async with _open_driver(request.param, database_url) as factory:
        yield factory


async def _rows(pg: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT id, message_id, topic, key, payload, headers::text AS headers, partition "
        f'FROM "{schema}".outbox ORDER BY id'
    )


# --- every driver -----------------------------------------------------------------------------------


async def test_committed_event_is_visible_to_another_connection(
    transaction: Transaction, schema: str, pg: asyncpg.Connection
) -> None:
    async with transaction(schema, True) as writer:
        result = await writer.enqueue("orders", {"id": 1}, key="order-1", headers={"tenant": "acme"})
        assert await _rows(pg, schema) == [], "visible before commit"
    [row] = await _rows(pg, schema)
    assert result == EnqueueResult(message_id=row["message_id"], inserted=True, id=row["id"])
    assert (row["topic"], row["key"], row["payload"]) == ("orders", "order-1", b'{"id":1}')
    assert json.loads(row["headers"]) == {"tenant": "acme", "content-type": "application/json"}


async def test_rolled_back_event_leaves_no_row(
    transaction: Transaction, schema: str, pg: asyncpg.Connection
) -> None:
    async with transaction(schema, False) as writer:
        result = await writer.enqueue("orders", b"gone", key="order-1")
        assert result.inserted
    assert await _rows(pg, schema) == []


async def test_same_message_id_twice_writes_one_row(
    transaction: Transaction, schema: str, pg: asyncpg.Connection
) -> None:
    message_id = uuid.uuid4()
    async with transaction(schema, True) as writer:
        first = await writer.enqueue("orders", b"first", message_id=message_id)
        again_in_same_transaction = await writer.enqueue("orders", b"first", message_id=message_id)
    async with transaction(schema, True) as writer:
        again_later = await writer.enqueue("orders", b"first", message_id=str(message_id))
    [row] = await _rows(pg, schema)
    assert first == EnqueueResult(message_id, inserted=True, id=row["id"])
    assert again_in_same_transaction == again_later == EnqueueResult(message_id, inserted=False, id=None)
    assert row["payload"] == b"first"


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"payload": {"id": 2}}, ("payload",)),
        ({"payload": b'{"id":1}'}, ("headers",)),  # the same bytes, but no JSON content-type
        ({"topic": "payments"}, ("topic",)),
        ({"key": "order-2"}, ("key",)),
        ({"key": None}, ("key",)),
        ({"headers": {"tenant": "other"}}, ("headers",)),
        ({"headers": {}}, ("headers",)),
        ({"topic": "payments", "payload": "x", "key": None}, ("topic", "key", "payload", "headers")),
    ],
)
async def test_same_message_id_with_other_content_is_a_conflict(
    transaction: Transaction,
    schema: str,
    pg: asyncpg.Connection,
    change: dict[str, Any],
    fields: tuple[str, ...],
) -> None:
    message_id = uuid.uuid4()
    event: dict[str, Any] = {
        "topic": "orders",
        "payload": {"id": 1},
        "key": "order-1",
        "headers": {"tenant": "a"},
    }
    async with transaction(schema, True) as writer:
        first = await writer.enqueue(**event, message_id=message_id)
        with pytest.raises(OutboxConflictError) as in_same_transaction:
            await writer.enqueue(**{**event, **change}, message_id=message_id)
    async with transaction(schema, False) as writer:
        with pytest.raises(OutboxConflictError) as later:
            await writer.enqueue(**{**event, **change}, message_id=str(message_id))
    for info in (in_same_transaction, later):
        assert info.value.conflicts == {message_id: fields}
        assert str(message_id) in str(info.value)
    # The same event again is an idempotent retry, even under another trace.
    async with transaction(schema, True) as writer:
        retried = await writer.enqueue(
            **{**event, "headers": {"tenant": "a", "traceparent": TRACEPARENT}}, message_id=message_id
        )
    assert retried == EnqueueResult(message_id, inserted=False, id=None)
    [row] = await _rows(pg, schema)
    assert first.id == row["id"] and row["payload"] == b'{"id":1}'


async def test_enqueue_many_conflict_names_every_conflicting_message_id(
    transaction: Transaction, schema: str, pg: asyncpg.Connection
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    async with transaction(schema, True) as writer:
        await writer.enqueue_many(
            [OutboxEvent("orders", b"a", message_id=a), OutboxEvent("orders", b"b", message_id=b)]
        )
    events = [
        OutboxEvent("orders", b"new"),
        OutboxEvent("orders", b"b", key="k", message_id=b),
        OutboxEvent("orders", b"a", message_id=a),  # the same: no conflict
        OutboxEvent("orders", b"A", message_id=a),  # ...but this one differs from it
    ]
    async with transaction(schema, False) as writer:
        with pytest.raises(OutboxConflictError, match=f"message_id {a} appears twice in this call"):
            await writer.enqueue_many(events)
    # Against stored rows: the conflict is reported after the statement; the rest of the call was
    # written in the caller's transaction, which decides (here: commits).
    async with transaction(schema, True) as writer:
        with pytest.raises(OutboxConflictError) as info:
            await writer.enqueue_many(events[:3])
    assert info.value.message_ids == (b,)
    assert info.value.conflicts == {b: ("key",)}
    assert [row["payload"] for row in await _rows(pg, schema)] == [b"a", b"b", b"new"]


@pytest.mark.parametrize("same", [True, False], ids=["same", "different"])
async def test_row_committed_by_a_concurrent_transaction_is_compared_too(
    transaction: Transaction, schema: str, database_url: str, pg: asyncpg.Connection, same: bool
) -> None:
    """The INSERT waits for a concurrent transaction holding the same message_id; when that commits,
    the row is not in the statement's snapshot and a second statement compares it."""
    message_id = uuid.uuid4()
    other = psycopg.connect(database_url)
    other.execute(
        f'INSERT INTO "{schema}".outbox (message_id, topic, payload) VALUES (%s, %s, %s)',
        (message_id, "orders", b"theirs"),
    )
    # A thread commits it: a sync driver blocks this event loop while its INSERT waits for the row lock.
    commit = threading.Timer(0.5, other.commit)
    commit.start()
    try:
        async with transaction(schema, True) as writer:
            if same:
                result = await writer.enqueue("orders", b"theirs", message_id=message_id)
            else:
                with pytest.raises(OutboxConflictError) as info:
                    await writer.enqueue("orders", b"mine", message_id=message_id)
    finally:
        commit.join()
        other.close()
    if same:
        assert result == EnqueueResult(message_id, inserted=False, id=None)
    else:
        assert info.value.conflicts == {message_id: ("payload",)}
    [row] = await _rows(pg, schema)
    assert row["payload"] == b"theirs"


async def test_enqueue_many_is_one_statement_in_input_order(
    transaction: Transaction, schema: str, pg: asyncpg.Connection
) -> None:
    statements = await _count_insert_statements(pg, schema)
    existing = uuid.uuid4()
    async with transaction(schema, True) as writer:
        await writer.enqueue("orders", b"existing", message_id=existing)
    repeated = uuid.uuid4()
    events = [
        OutboxEvent("orders", b"1", key="order-1", message_id=repeated),
        OutboxEvent("payments", {"n": 2}, key="order-1"),
        OutboxEvent("orders", b"existing", message_id=existing),
        OutboxEvent("orders", "4", key="order-2", headers={"h": "v"}),
        OutboxEvent("orders", b"1", key="order-1", message_id=repeated),
    ]
    before = await statements()
    async with transaction(schema, True) as writer:
        results = await writer.enqueue_many(events)
    assert await statements() == before + 1

    assert [r.inserted for r in results] == [True, True, False, True, False]
    assert [r.message_id for r in results[2:]] == [existing, results[3].message_id, repeated]
    rows = (await _rows(pg, schema))[1:]
    inserted = [(r.id, r.message_id) for r in results if r.inserted]
    assert [(row["id"], row["message_id"]) for row in rows] == inserted
    assert [row["payload"] for row in rows] == [b"1", b'{"n":2}', b"4"]
    assert [row["topic"] for row in rows] == ["orders", "payments", "orders"]
    assert [row["key"] for row in rows] == ["order-1", "order-1", "order-2"]
    ids = [row["id"] for row in rows]
    assert ids == sorted(ids)


async def _count_insert_statements(pg: asyncpg.Connection, schema: str) -> Callable[[], Awaitable[int]]:
    """Install a statement-level trigger counting INSERT statements on the outbox; whatever the driver,
    the server is the witness of how many statements ran."""
    await pg.execute(f"""
        CREATE TABLE "{schema}".test_insert_statements (n bigint GENERATED ALWAYS AS IDENTITY);
        CREATE FUNCTION "{schema}".test_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO "{schema}".test_insert_statements DEFAULT VALUES; RETURN NULL; END $$;
        CREATE TRIGGER test_count_insert AFTER INSERT ON "{schema}".outbox
        FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".test_count_insert();
    """)

    async def count() -> int:
        return int(await pg.fetchval(f'SELECT count(*) FROM "{schema}".test_insert_statements'))

    return count


# --- asyncpg specifics ------------------------------------------------------------------------------


async def test_asyncpg_enqueue_many_is_one_round_trip(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    first_call: list[str] = []
    second_call: list[str] = []
    events = [OutboxEvent("orders", str(n)) for n in range(50)]
    try:
        async with conn.transaction():
            await _logging_queries(conn, first_call, aenqueue_many(conn, events[:2], schema=schema))
            results = await _logging_queries(conn, second_call, aenqueue_many(conn, events, schema=schema))
    finally:
        await conn.close()
    # asyncpg looks up the array types once per connection; from then on it is one round trip.
    assert [q for q in first_call if "outbox" in q] == second_call
    assert len(second_call) == 1 and "INSERT INTO" in second_call[0]
    ids = [r.id for r in results]
    assert all(r.inserted for r in results)
    assert ids == sorted(ids) and len(set(ids)) == 50


async def test_asyncpg_one_event_is_one_plain_insert_and_a_retry_compares_after_it(
    database_url: str, schema: str
) -> None:
    """A new event costs one plain INSERT (no arrays: the cheap path for Postgres); only a message_id
    that already exists pays a second round trip to compare it."""
    conn = await asyncpg.connect(database_url)
    message_id = uuid.uuid4()
    new: list[str] = []
    again: list[str] = []
    conflict: list[str] = []
    try:
        async with conn.transaction():
            first = await _logging_queries(
                conn, new, aenqueue(conn, "orders", b"x", message_id=message_id, schema=schema)
            )
            retried = await _logging_queries(
                conn, again, aenqueue(conn, "orders", b"x", message_id=message_id, schema=schema)
            )
            with pytest.raises(OutboxConflictError):
                await _logging_queries(
                    conn, conflict, aenqueue(conn, "orders", b"y", message_id=message_id, schema=schema)
                )
    finally:
        await conn.close()
    assert first.inserted and retried.inserted is False
    [insert] = new
    assert "INSERT INTO" in insert and "unnest" not in insert
    # (asyncpg looks the array types of the comparison up on its first use: not a round trip per call)
    insert_again, compare = conflict
    assert insert_again == insert and again[0] == insert and again[-1] == compare
    assert "INSERT" not in compare and "outbox o" in compare


async def _logging_queries(conn: asyncpg.Connection, queries: list[str], call: Awaitable[Any]) -> Any:
    def log(logged: Any) -> None:
        queries.append(logged.query)

    conn.add_query_logger(log)
    try:
        return await call
    finally:
        conn.remove_query_logger(log)


async def test_enqueue_notifies_after_commit(database_url: str, schema: str, pg: asyncpg.Connection) -> None:
    async with _listening(pg, schema) as notifications:
        writer = await asyncpg.connect(database_url)
        try:
            async with writer.transaction():
                await aenqueue(writer, "orders", b"x", key="order-1", schema=schema)
                # Sent after the enqueue: had the enqueue notified before commit, it would come first.
                assert await _sentinel(pg, schema, notifications) == [], "notified before commit"
        finally:
            await writer.close()
        partition = await asyncio.wait_for(notifications.get(), NOTIFY_TIMEOUT)
    [row] = await _rows(pg, schema)
    assert partition == str(row["partition"])


# --- the plain-SQL contract -------------------------------------------------------------------------


def _plain_insert(schema: str) -> str:
    return (
        f"INSERT INTO {schema}.outbox (topic, key, payload) "
        "VALUES ('orders', 'order-1', convert_to('{\"id\":1}', 'UTF8'))"
    )


@asynccontextmanager
async def _listening(pg: asyncpg.Connection, schema: str) -> AsyncIterator[asyncio.Queue[str]]:
    channel = f"{schema}.outbox_inserted"
    notifications: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(connection: Any, pid: int, channel: str, payload: str) -> None:
        notifications.put_nowait(payload)

    await pg.add_listener(channel, on_notify)
    try:
        yield notifications
    finally:
        await pg.remove_listener(channel, on_notify)


async def _sentinel(pg: asyncpg.Connection, schema: str, notifications: asyncio.Queue[str]) -> list[str]:
    """Sends a notification of its own and waits for it; returns what arrived before it. Notifications
    arrive in commit order, so this is every notification committed before the call."""
    await pg.execute("SELECT pg_notify($1, 'sentinel')", f"{schema}.outbox_inserted")
    before: list[str] = []
    while (payload := await asyncio.wait_for(notifications.get(), NOTIFY_TIMEOUT)) != "sentinel":
        before.append(payload)
    return before


async def test_plain_sql_insert_works_and_notifies_on_commit(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    async with _listening(pg, schema) as notifications:
        writer = await asyncpg.connect(database_url)
        try:
            async with writer.transaction():
                await writer.execute(_plain_insert(schema))
            partition = await asyncio.wait_for(notifications.get(), NOTIFY_TIMEOUT)
        finally:
            await writer.close()
    [row] = await _rows(pg, schema)
    assert (row["topic"], row["key"], row["payload"]) == ("orders", "order-1", b'{"id":1}')
    assert row["headers"] == "{}"
    assert isinstance(row["message_id"], uuid.UUID)
    assert partition == str(row["partition"])


async def test_rolled_back_plain_insert_does_not_notify(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    async with _listening(pg, schema) as notifications:
        writer = await asyncpg.connect(database_url)
        try:
            transaction = writer.transaction()
            await transaction.start()
            await writer.execute(_plain_insert(schema))
            await transaction.rollback()
            # Notifications arrive in commit order, so had the rollback notified, it would come first.
            await writer.execute(_plain_insert(schema).replace("order-1", "sentinel"))
            first = await asyncio.wait_for(notifications.get(), NOTIFY_TIMEOUT)
        finally:
            await writer.close()
        assert await _sentinel(pg, schema, notifications) == []
    [row] = await _rows(pg, schema)
    assert row["key"] == "sentinel"
    assert first == str(row["partition"])
