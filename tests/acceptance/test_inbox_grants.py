"""The inbox under least privilege (docs/grants.sql, run with psql as the docs say): a consuming
service, running as the writer role, processes messages through the inbox but cannot delete inbox
rows; the relay role counts stale claims and runs the retention clean-up but cannot claim."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from clients.inbox import AsyncInbox, InboxMessage, InboxOutcome
from relay.maintenance import cleanup_inbox
from relay.store import RelayStore
from tests.acceptance.test_least_privilege import Roles, roles  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


async def test_writer_role_consumes_and_relay_role_cleans_up(roles: Roles, schema: str) -> None:  # noqa: F811
    m = InboxMessage(str(uuid.uuid4()), "orders", "k1", b"{}", {})
    inbox = AsyncInbox("billing", schema=schema, worker_id="svc-1", max_attempts=1)

    async def handler(conn: asyncpg.Connection, message: InboxMessage) -> None:
        await conn.execute("SELECT 1")

    async def failing(conn: asyncpg.Connection, message: InboxMessage) -> None:
        raise RuntimeError("nope")

    writer = await asyncpg.connect(roles.urls["writer"])
    try:
        assert (await inbox.process(writer, m, handler)).outcome is InboxOutcome.PROCESSED
        assert (await inbox.process(writer, m, handler)).outcome is InboxOutcome.DUPLICATE
        doomed = InboxMessage(str(uuid.uuid4()), "orders", "k1", b"{}", {})
        assert (await inbox.process(writer, doomed, failing)).outcome is InboxOutcome.GAVE_UP
        assert await inbox.count_stale_locks(writer) == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute(f'DELETE FROM "{schema}".inbox')
    finally:
        await writer.close()

    relay = await asyncpg.connect(roles.urls["relay"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await AsyncInbox("billing", schema=schema).process(
                relay, InboxMessage(str(uuid.uuid4()), "orders", None, b"", {}), handler
            )
    finally:
        await relay.close()
    store = RelayStore(roles.urls["relay"], schema, pool_size=2)
    await store.open()
    try:
        assert await store.inbox_stale_locks(300) == []
        assert (await cleanup_inbox(store, 0.001, 100)).deleted == 1  # the processed row, not the failed one
    finally:
        await store.close()
