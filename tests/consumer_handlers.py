"""Handlers the consumer tests run with `outbox-relay consume tests.consumer_handlers:<name>`.

The business effect is a row in the table named by CONSUMER_TEST_TABLE (schema.table, made by
`effects_table_sql`), written in the inbox's transaction: it commits together with the processed
mark, or not at all. CONSUMER_TEST_DELAY (seconds) makes the handler slow; CONSUMER_TEST_STARTED
names a file the handler appends the message id to when it starts (so a test can act mid-handler)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from clients.inbox import InboxMessage


def effects_table_sql(table: str) -> str:
    return (
        f"CREATE TABLE {table} (seq bigserial PRIMARY KEY, message_id text NOT NULL, topic text NOT NULL,"
        " key text, consumer text NOT NULL, payload bytea)"
    )


INSERT = "INSERT INTO {table} (message_id, topic, key, consumer, payload) VALUES ($1, $2, $3, $4, $5)"


def _table() -> str:
    table = os.environ.get("CONSUMER_TEST_TABLE", "")
    if not table:
        raise RuntimeError("CONSUMER_TEST_TABLE is not set")
    return table


def _who() -> str:
    return os.environ.get("POD_NAME") or str(os.getpid())


async def record(conn: Any, message: InboxMessage) -> None:
    """Inserts the business row (asyncpg connection)."""
    started = os.environ.get("CONSUMER_TEST_STARTED")
    if started:
        await asyncio.to_thread(_append, Path(started), message.message_id)
    delay = float(os.environ.get("CONSUMER_TEST_DELAY", "0") or 0)
    if delay:
        await asyncio.sleep(delay)
    if b"poison" in message.payload:
        raise ValueError(f"cannot bill {message.key}: poison payload")
    await conn.execute(
        INSERT.format(table=_table()), message.message_id, message.topic, message.key, _who(), message.payload
    )


def _append(path: Path, line: str) -> None:
    with path.open("a") as out:
        out.write(line + "\n")


def record_sync(conn: Any, message: InboxMessage) -> Any:
    """A plain function: returns the awaitable of its statement, which the inbox awaits."""
    return conn.execute(
        INSERT.format(table=_table()), message.message_id, message.topic, message.key, _who(), message.payload
    )


not_callable = 42
