"""clients.inbox against real PostgreSQL (issue 14): every driver processes once, skips duplicates,
records failures and gives up; the handler's business row and the processed mark commit together;
a stale holder that comes back late cannot mark processed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from clients.inbox import (
    AsyncInbox,
    Inbox,
    InboxError,
    InboxMessage,
    InboxOutcome,
    InboxResult,
    InboxValidationError,
)
from devtools.fleet import wait_until
from relay.shared.dburl import sqlalchemy_url

DRIVERS = ("asyncpg", "psycopg_async", "sqlalchemy_async", "psycopg", "sqlalchemy")


def message(message_id: str | None = None, *, key: str | None = "k1") -> InboxMessage:
    return InboxMessage(
        message_id=message_id or str(uuid.uuid4()),
        topic="orders",
        key=key,
        payload=b'{"n": 1}',
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        source="test",
    )


class Boom(RuntimeError):
    pass


@dataclass
class Worker:
    """One driver's view: process(message, fail=...) runs the inbox with a handler that writes the
    business row (table effects) and then raises Boom when asked to."""

    driver: str
    run: Callable[[InboxMessage, bool], Awaitable[InboxResult]]
    conn: Any


@pytest.fixture
async def effects(pg: asyncpg.Connection, schema: str) -> str:
    # No unique constraint: a second business effect must show up as a second row.
    await pg.execute(f'CREATE TABLE "{schema}".effects (id serial PRIMARY KEY, message_id text NOT NULL)')
    return f'"{schema}".effects'


async def effect_count(pg: asyncpg.Connection, table: str, message_id: str) -> int:
    return int(await pg.fetchval(f"SELECT count(*) FROM {table} WHERE message_id = $1", message_id))


async def inbox_row(pg: asyncpg.Connection, schema: str, consumer: str, message_id: str) -> asyncpg.Record:
    row = await pg.fetchrow(
        f'SELECT * FROM "{schema}".inbox WHERE consumer = $1 AND message_id = $2', consumer, message_id
    )
    assert row is not None
    return row


@contextlib.asynccontextmanager
async def worker(
    driver: str, database_url: str, table: str, inbox: AsyncInbox | Inbox
) -> AsyncIterator[Worker]:
    insert_dollar = f"INSERT INTO {table} (message_id) VALUES ($1)"
    insert_percent = f"INSERT INTO {table} (message_id) VALUES (%s)"
    insert_named = sqlalchemy.text(f"INSERT INTO {table} (message_id) VALUES (:m)")
    assert isinstance(inbox, AsyncInbox) == driver.endswith(("_async", "asyncpg"))

    def fail_if(fail: bool) -> None:
        if fail:
            raise Boom("card declined for order 7")

    if driver == "asyncpg":
        conn = await asyncpg.connect(database_url)

        async def asyncpg_handler(c: asyncpg.Connection, m: InboxMessage, fail: bool) -> None:
            await c.execute(insert_dollar, m.message_id)
            fail_if(fail)

        try:
            yield Worker(driver, lambda m, fail: inbox.process(conn, m, lambda c, mm: asyncpg_handler(c, mm, fail)), conn)  # type: ignore[arg-type,return-value]
        finally:
            await conn.close()
    elif driver == "psycopg_async":
        aconn = await psycopg.AsyncConnection.connect(database_url)

        async def psycopg_handler(c: psycopg.AsyncConnection[Any], m: InboxMessage, fail: bool) -> None:
            await c.execute(insert_percent, (m.message_id,))
            fail_if(fail)

        try:
            yield Worker(driver, lambda m, fail: inbox.process(aconn, m, lambda c, mm: psycopg_handler(c, mm, fail)), aconn)  # type: ignore[arg-type,return-value]
        finally:
            await aconn.close()
    elif driver == "sqlalchemy_async":
        engine = create_async_engine(sqlalchemy_url(database_url, "asyncpg"))
        try:
            async with engine.connect() as saconn:

                async def sa_handler(c: Any, m: InboxMessage, fail: bool) -> None:
                    await c.execute(insert_named, {"m": m.message_id})
                    fail_if(fail)

                yield Worker(driver, lambda m, fail: inbox.process(saconn, m, lambda c, mm: sa_handler(c, mm, fail)), saconn)  # type: ignore[arg-type,return-value]
        finally:
            await engine.dispose()
    elif driver == "psycopg":
        sconn = psycopg.connect(database_url)

        def psycopg_sync_handler(c: psycopg.Connection[Any], m: InboxMessage, fail: bool) -> None:
            c.execute(insert_percent, (m.message_id,))
            fail_if(fail)

        async def run_psycopg(m: InboxMessage, fail: bool) -> InboxResult:
            assert isinstance(inbox, Inbox)
            return inbox.process(sconn, m, lambda c, mm: psycopg_sync_handler(c, mm, fail))

        try:
            yield Worker(driver, run_psycopg, sconn)
        finally:
            sconn.close()
    else:
        sync_engine = sqlalchemy.create_engine(sqlalchemy_url(database_url, "psycopg"))
        try:
            with sync_engine.connect() as sync_conn:

                def sa_sync_handler(c: Any, m: InboxMessage, fail: bool) -> None:
                    c.execute(insert_named, {"m": m.message_id})
                    fail_if(fail)

                async def run_sa(m: InboxMessage, fail: bool) -> InboxResult:
                    assert isinstance(inbox, Inbox)
                    return inbox.process(sync_conn, m, lambda c, mm: sa_sync_handler(c, mm, fail))

                yield Worker(driver, run_sa, sync_conn)
        finally:
            sync_engine.dispose()


def make_inbox(driver: str, consumer: str, schema: str, **options: Any) -> AsyncInbox | Inbox:
    cls = AsyncInbox if driver.endswith(("_async", "asyncpg")) else Inbox
    return cls(consumer, schema=schema, **options)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_processed_once_then_duplicate(
    driver: str, database_url: str, schema: str, effects: str, pg: asyncpg.Connection
) -> None:
    inbox = make_inbox(driver, "billing", schema, worker_id="worker-a")
    m = message()
    async with worker(driver, database_url, effects, inbox) as w:
        first = await w.run(m, False)
        assert first == InboxResult(InboxOutcome.PROCESSED, 1)
        row = await inbox_row(pg, schema, "billing", m.message_id)
        assert row["status"] == "processed" and row["processed_at"] is not None
        assert (row["locked_at"], row["locked_by"], row["attempts"]) == (None, None, 1)
        assert (row["topic"], row["key"]) == ("orders", "k1")

        again = await w.run(m, False)
        assert again.outcome is InboxOutcome.DUPLICATE and again.attempts == 1
        # The same message for another consumer (service) is a new message there.
        other = make_inbox(driver, "shipping", schema, worker_id="worker-a")
        async with worker(driver, database_url, effects, other) as w2:
            assert (await w2.run(m, False)).outcome is InboxOutcome.PROCESSED
    assert await effect_count(pg, effects, m.message_id) == 2  # billing once, shipping once


@pytest.mark.parametrize("driver", DRIVERS)
async def test_failure_rolls_back_the_business_row_then_retry_then_give_up(
    driver: str, database_url: str, schema: str, effects: str, pg: asyncpg.Connection
) -> None:
    inbox = make_inbox(driver, "billing", schema, worker_id="worker-a", max_attempts=2)
    retried, doomed = message(), message()
    async with worker(driver, database_url, effects, inbox) as w:
        failed = await w.run(retried, True)
        assert failed.outcome is InboxOutcome.FAILED and failed.attempts == 1
        assert failed.error == "Boom: card declined for order 7"
        # The handler wrote its row before raising: rolled back with everything else.
        assert await effect_count(pg, effects, retried.message_id) == 0
        row = await inbox_row(pg, schema, "billing", retried.message_id)
        assert (row["status"], row["locked_at"], row["locked_by"]) == ("processing", None, None)
        assert (row["attempts"], row["last_error"]) == (1, "Boom: card declined for order 7")

        ok = await w.run(retried, False)
        assert (ok.outcome, ok.attempts) == (InboxOutcome.PROCESSED, 2)
        assert await effect_count(pg, effects, retried.message_id) == 1

        assert (await w.run(doomed, True)).outcome is InboxOutcome.FAILED
        gave_up = await w.run(doomed, True)
        assert (gave_up.outcome, gave_up.attempts) == (InboxOutcome.GAVE_UP, 2)
        assert gave_up.error == "Boom: card declined for order 7"
        row = await inbox_row(pg, schema, "billing", doomed.message_id)
        assert (row["status"], row["attempts"], row["locked_by"]) == ("failed", 2, None)
        # Given up: not run again, whatever comes.
        later = await w.run(doomed, False)
        assert (later.outcome, later.attempts) == (InboxOutcome.GAVE_UP, 2)
        assert later.error == "Boom: card declined for order 7"
    assert await effect_count(pg, effects, doomed.message_id) == 0


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_connection_inside_a_transaction_is_refused(
    driver: str, database_url: str, schema: str, effects: str, pg: asyncpg.Connection
) -> None:
    inbox = make_inbox(driver, "billing", schema)
    m = message()
    async with worker(driver, database_url, effects, inbox) as w:
        conn = w.conn
        if driver == "asyncpg":
            tx = conn.transaction()
            await tx.start()
        elif driver == "psycopg_async":
            await conn.execute("SELECT 1")  # non-autocommit: a transaction is now open
        elif driver == "sqlalchemy_async":
            await conn.execute(sqlalchemy.text("SELECT 1"))  # autobegin
        else:
            conn.execute(sqlalchemy.text("SELECT 1") if driver == "sqlalchemy" else "SELECT 1")
        with pytest.raises(InboxError, match="inside a transaction"):
            await w.run(m, False)
    row = await pg.fetchrow(f'SELECT 1 FROM "{schema}".inbox WHERE message_id = $1', m.message_id)
    assert row is None


async def test_bad_input_gets_a_clear_error(pg: asyncpg.Connection, schema: str, database_url: str) -> None:
    inbox = AsyncInbox("billing", schema=schema)

    async def handler(conn: Any, m: InboxMessage) -> None:
        raise AssertionError("must not run")

    no_id = InboxMessage(message_id="", topic="orders", key=None, payload=b"", headers={}, source="kafka:orders[0]@7")
    with pytest.raises(InboxValidationError, match=r"kafka:orders\[0\]@7.*no message_id"):
        await inbox.process(pg, no_id, handler)
    for consumer in ("", " billing", "bill\ning", "x" * 201):
        with pytest.raises(InboxValidationError, match="consumer"):
            AsyncInbox(consumer, schema=schema)
    with pytest.raises(InboxValidationError, match="consumer must be a str"):
        AsyncInbox(None, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(InboxValidationError, match="schema"):
        AsyncInbox("billing", schema="Bad-Schema")
    with pytest.raises(InboxValidationError, match="lock_stale_threshold"):
        AsyncInbox("billing", lock_stale_threshold=0)
    with pytest.raises(InboxValidationError, match="max_attempts"):
        Inbox("billing", max_attempts=0)
    with psycopg.connect(database_url) as sync_conn:
        with pytest.raises(TypeError, match="synchronous connection: use Inbox"):
            await inbox.process(sync_conn, message(), handler)
        with pytest.raises(TypeError, match="unsupported connection type"):
            await inbox.process(object(), message(), handler)
    with pytest.raises(TypeError, match="asynchronous connection: use AsyncInbox"):
        Inbox("billing", schema=schema).process(pg, message(), lambda c, m: None)


def test_the_documented_defaults_are_the_inbox_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OUTBOX_INBOX_LOCK_STALE_THRESHOLD", "OUTBOX_INBOX_MAX_ATTEMPTS", "POD_NAME"):
        monkeypatch.delenv(name, raising=False)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `(OUTBOX_INBOX_[A-Z_]+)` \| `([^`]+)` \|", docs, re.MULTILINE))
    settings = AsyncInbox("billing").settings
    assert float(rows["OUTBOX_INBOX_LOCK_STALE_THRESHOLD"]) == settings.lock_stale_threshold == 300
    assert int(rows["OUTBOX_INBOX_MAX_ATTEMPTS"]) == settings.max_attempts == 5


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_INBOX_LOCK_STALE_THRESHOLD", "12.5")
    monkeypatch.setenv("OUTBOX_INBOX_MAX_ATTEMPTS", "9")
    monkeypatch.setenv("POD_NAME", "billing-7d9f-x2")
    settings = AsyncInbox("billing").settings
    assert (settings.lock_stale_threshold, settings.max_attempts, settings.worker_id) == (12.5, 9, "billing-7d9f-x2")
    # An argument wins over the environment.
    assert Inbox("billing", max_attempts=3, worker_id="w").settings.max_attempts == 3
    monkeypatch.delenv("POD_NAME")
    assert ":" in AsyncInbox("billing").worker_id  # hostname:pid
    monkeypatch.setenv("OUTBOX_INBOX_MAX_ATTEMPTS", "many")
    with pytest.raises(InboxValidationError, match="OUTBOX_INBOX_MAX_ATTEMPTS must be a whole number"):
        AsyncInbox("billing")


async def test_pool_connections_are_accepted(database_url: str, schema: str, effects: str) -> None:
    inbox = AsyncInbox("billing", schema=schema)
    m = message()

    async def handler(conn: Any, msg: InboxMessage) -> None:
        await conn.execute(f"INSERT INTO {effects} (message_id) VALUES ($1)", msg.message_id)

    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool, pool.acquire() as conn:
        assert (await inbox.process(conn, m, handler)).outcome is InboxOutcome.PROCESSED
        assert (await inbox.process(conn, m, handler)).outcome is InboxOutcome.DUPLICATE


async def test_a_stale_holder_that_comes_back_late_cannot_mark_processed(
    database_url: str, schema: str, effects: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A's handler outlives the stale threshold; B takes the message over and processes it;
    when A's handler finishes, its processed mark finds the claim gone: A's transaction (and its
    business row) rolls back, and A reports the duplicate."""
    caplog.set_level(logging.INFO, logger="clients.inbox")
    m = message()
    slow = AsyncInbox("billing", schema=schema, worker_id="worker-a", lock_stale_threshold=1.0)
    fast = AsyncInbox("billing", schema=schema, worker_id="worker-b", lock_stale_threshold=1.0)
    a_wrote, b_done = asyncio.Event(), asyncio.Event()

    async def slow_handler(conn: asyncpg.Connection, msg: InboxMessage) -> None:
        await conn.execute(f"INSERT INTO {effects} (message_id) VALUES ($1)", "by-a")
        a_wrote.set()
        await asyncio.wait_for(b_done.wait(), 60)

    async def fast_handler(conn: asyncpg.Connection, msg: InboxMessage) -> None:
        await conn.execute(f"INSERT INTO {effects} (message_id) VALUES ($1)", "by-b")

    a_conn, b_conn = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        a_task = asyncio.create_task(slow.process(a_conn, m, slow_handler))
        await asyncio.wait_for(a_wrote.wait(), 30)
        results: list[InboxResult] = []

        async def b_took_it() -> bool:
            results.append(await fast.process(b_conn, m, fast_handler))
            return results[-1].outcome is not InboxOutcome.LOCKED

        await wait_until(b_took_it, timeout=30, interval=0.2, what="worker B taking over")
        b_done.set()
        a_result = await asyncio.wait_for(a_task, 30)
    finally:
        await a_conn.close()
        await b_conn.close()
    # B was refused while A's lock was young, then took over from A.
    assert results[0] == InboxResult(InboxOutcome.LOCKED, 1, holder="worker-a")
    assert results[-1] == InboxResult(InboxOutcome.PROCESSED, 2, previous_holder="worker-a")
    assert a_result.outcome is InboxOutcome.DUPLICATE
    rows = [r["message_id"] for r in await pg.fetch(f"SELECT message_id FROM {effects}")]
    assert rows == ["by-b"]
    row = await inbox_row(pg, schema, "billing", m.message_id)
    assert (row["status"], row["attempts"], row["locked_by"]) == ("processed", 2, None)
    text = caplog.text
    assert "locked by another worker (worker-a)" in text
    assert "took over message" in text and "from worker worker-a" in text
    assert "was taken over by another worker" in text


async def test_a_worker_that_dies_on_its_last_attempt_gives_up(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    """A message that kills its worker every time is not retried for ever: a stale lock on the last
    allowed attempt turns the row 'failed'."""
    m = message()
    await pg.execute(
        f'INSERT INTO "{schema}".inbox (consumer, message_id, status, locked_at, locked_by, attempts)'
        " VALUES ('billing', $1, 'processing', now() - interval '1 hour', 'dead-worker', 3)",
        m.message_id,
    )
    inbox = AsyncInbox("billing", schema=schema, max_attempts=3, lock_stale_threshold=60)

    async def handler(conn: Any, msg: InboxMessage) -> None:
        raise AssertionError("must not run")

    result = await inbox.process(pg, m, handler)
    assert (result.outcome, result.attempts, result.previous_holder) == (InboxOutcome.GAVE_UP, 3, "dead-worker")
    assert result.error is not None and "dead-worker stopped during the last one" in result.error
    row = await inbox_row(pg, schema, "billing", m.message_id)
    assert (row["status"], row["locked_by"]) == ("failed", None)


async def test_count_stale_locks(database_url: str, schema: str, pg: asyncpg.Connection) -> None:
    for holder, age in (("w1", "1 hour"), ("w2", "2 hours"), ("w3", "1 second")):
        await pg.execute(
            f'INSERT INTO "{schema}".inbox (consumer, message_id, locked_at, locked_by, attempts)'
            f" VALUES ('billing', $1, now() - interval '{age}', $2, 1)",
            str(uuid.uuid4()),
            holder,
        )
    assert await AsyncInbox("billing", schema=schema, lock_stale_threshold=60).count_stale_locks(pg) == 2
    assert await AsyncInbox("shipping", schema=schema, lock_stale_threshold=60).count_stale_locks(pg) == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert Inbox("billing", schema=schema, lock_stale_threshold=60).count_stale_locks(conn) == 2


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_claim_left_behind_by_a_broken_connection_is_given_back_by_its_own_inbox(
    driver: str, database_url: str, schema: str, effects: str, pg: asyncpg.Connection
) -> None:
    """The handler's connection breaks (the server ends the session): the claim cannot be released then,
    but the same inbox gives it back on the next delivery instead of waiting out the 300 s threshold.
    Another inbox with the same worker id (another process of the same pod) still sees it LOCKED."""
    inbox = make_inbox(driver, "billing", schema, worker_id="worker-a", lock_stale_threshold=300)
    m = message()
    insert = f"INSERT INTO {effects} (message_id) VALUES ($1)"

    async def kill(pid: int) -> None:
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)

    if driver == "asyncpg":
        broken = await asyncpg.connect(database_url)

        async def dies(conn: asyncpg.Connection, msg: InboxMessage) -> None:
            await conn.execute(insert, msg.message_id)
            await kill(conn.get_server_pid())
            await conn.execute("SELECT 1")

        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError)):
            await inbox.process(broken, m, dies)  # type: ignore[union-attr]
        await broken.close()
    else:
        loop = asyncio.get_running_loop()
        broken_sync = await asyncio.to_thread(psycopg.connect, database_url, autocommit=True)

        def dies_sync(conn: psycopg.Connection[Any], msg: InboxMessage) -> None:
            conn.execute(insert.replace("$1", "%s"), (msg.message_id,))
            asyncio.run_coroutine_threadsafe(kill(conn.info.backend_pid), loop).result(30)
            conn.execute("SELECT 1")

        with pytest.raises(psycopg.Error):
            await asyncio.to_thread(inbox.process, broken_sync, m, dies_sync)  # type: ignore[arg-type]
        await asyncio.to_thread(broken_sync.close)

    row = await inbox_row(pg, schema, "billing", m.message_id)
    assert (row["status"], row["locked_by"], row["attempts"]) == ("processing", "worker-a", 1)

    async def ok(conn: asyncpg.Connection, msg: InboxMessage) -> None:
        await conn.execute(insert, msg.message_id)

    other = AsyncInbox("billing", schema=schema, worker_id="worker-a", lock_stale_threshold=300)
    fresh = await asyncpg.connect(database_url)
    try:
        assert (await other.process(fresh, m, ok)).outcome is InboxOutcome.LOCKED
        if driver == "asyncpg":
            again = await inbox.process(fresh, m, ok)  # type: ignore[union-attr]
        else:
            fresh_sync = await asyncio.to_thread(psycopg.connect, database_url, autocommit=True)

            def ok_sync(conn: psycopg.Connection[Any], msg: InboxMessage) -> None:
                conn.execute(insert.replace("$1", "%s"), (msg.message_id,))

            try:
                again = await asyncio.to_thread(inbox.process, fresh_sync, m, ok_sync)  # type: ignore[arg-type]
            finally:
                await asyncio.to_thread(fresh_sync.close)
    finally:
        await fresh.close()
    assert (again.outcome, again.attempts) == (InboxOutcome.PROCESSED, 2)
    assert await effect_count(pg, effects, m.message_id) == 1
