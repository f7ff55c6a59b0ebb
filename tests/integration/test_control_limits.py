"""The control plane's limits against real PostgreSQL: its own pool with statement and lock timeouts,
a cap on concurrent calls (RESOURCE_EXHAUSTED at once beyond it), a server-side cap on deadlines, and
GetStatus figures shared by concurrent calls and bounded by OUTBOX_CONTROL_COUNT_LIMIT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from control.server import ControlServer
from devtools.fleet import wait_until
from tests.integration.control_server import ADMIN_TOKEN, lock_waiters, start_server

METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@asynccontextmanager
async def running(database_url: str, schema: str, **overrides: Any) -> AsyncIterator[tuple[ControlServer, Any]]:
    server = await start_server(database_url, schema, **overrides)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.ControlServiceStub(channel)
    finally:
        await server.stop(0)


@asynccontextmanager
async def table_locked(database_url: str, schema: str, table: str) -> AsyncIterator[None]:
    """Holds an ACCESS EXCLUSIVE lock on `table`: control-plane statements reading it wait."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{schema}".{table} IN ACCESS EXCLUSIVE MODE')
            yield
    finally:
        await conn.close()


async def _waiting(pg: asyncpg.Connection, schema: str, count: int) -> bool:
    return await lock_waiters(pg, schema) >= count


async def status_code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_its_connections_carry_the_statement_lock_and_idle_timeouts(database_url: str, schema: str) -> None:
    async with running(
        database_url, schema, statement_timeout=1.5, lock_timeout=0.25, idle_in_transaction_timeout=7
    ) as (server, _):
        pool = server._pool
        assert pool is not None
        async with pool.acquire() as conn:
            settings = await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', 'application_name')"
            )
        assert {r["name"]: r["setting"] for r in settings} == {
            "statement_timeout": "1500",
            "lock_timeout": "250",
            "idle_in_transaction_session_timeout": "7000",
            "application_name": "outbox-relay-control",
        }


async def test_a_statement_over_the_timeout_is_cancelled_with_a_clear_status(database_url: str, schema: str) -> None:
    async with (
        running(database_url, schema, statement_timeout=0.3, lock_timeout=30) as (_, stub),
        table_locked(database_url, schema, "distributed_locks"),
    ):
        started = time.monotonic()
        code, message = await status_code(stub.ListLocks(pb.ListLocksRequest(), metadata=METADATA, timeout=20))
        took = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, message)
    assert "OUTBOX_CONTROL_STATEMENT_TIMEOUT" in message
    assert took < 5, took


async def test_calls_beyond_the_limit_are_refused_at_once(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    async with (
        running(database_url, schema, max_concurrent_rpcs=2, lock_timeout=30, statement_timeout=30) as (server, stub),
    ):
        async with table_locked(database_url, schema, "distributed_locks"):
            held = [
                asyncio.ensure_future(stub.ListLocks(pb.ListLocksRequest(), metadata=METADATA, timeout=20))
                for _ in range(2)
            ]
            # Both are in flight, waiting for the lock.
            await wait_until(lambda: _waiting(pg, schema, 2), 10, 0.05, "both calls waiting for the lock")
            started = time.monotonic()
            code, message = await status_code(stub.ListPauses(pb.ListPausesRequest(), metadata=METADATA, timeout=20))
            refused_in = time.monotonic() - started
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
            assert "OUTBOX_CONTROL_MAX_CONCURRENT_RPCS" in message
            assert refused_in < 1, refused_in
            # Health checks are not counted.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The lock is gone: the held calls finish, and there is room again.
        assert all(r.locks == [] for r in await asyncio.gather(*held))
        await stub.ListPauses(pb.ListPausesRequest(), metadata=METADATA, timeout=20)


async def test_a_call_without_deadline_gets_the_server_cap(database_url: str, schema: str) -> None:
    async with (
        running(database_url, schema, max_deadline=0.5, lock_timeout=30, statement_timeout=30) as (_, stub),
        table_locked(database_url, schema, "distributed_locks"),
    ):
        started = time.monotonic()
        code, message = await status_code(stub.ListLocks(pb.ListLocksRequest(), metadata=METADATA))  # no deadline
        took = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, message)
    assert took < 5, took


@pytest.mark.parametrize("count_limit", [3, 1000])
async def test_status_counts_at_most_the_count_limit(
    database_url: str, schema: str, pg: asyncpg.Connection, count_limit: int
) -> None:
    await pg.execute(
        f'INSERT INTO "{schema}".outbox (topic, key, payload)'
        " SELECT 'orders', 'k' || i, '\\x78'::bytea FROM generate_series(1, 10) AS i"
    )
    async with running(database_url, schema, count_limit=count_limit) as (_, stub):
        status = await stub.GetStatus(pb.GetStatusRequest(), metadata=METADATA, timeout=20)
    assert [(b.topic, b.pending_count) for b in status.backlog] == [("orders", min(10, count_limit))]


async def test_concurrent_status_calls_share_one_reading_until_a_mutation(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    async with running(database_url, schema, status_cache_ttl=60, max_concurrent_rpcs=50) as (_, stub):
        await pg.execute(f"INSERT INTO \"{schema}\".outbox (topic, payload) VALUES ('orders', '\\x78'::bytea)")
        first = await asyncio.gather(
            *(stub.GetStatus(pb.GetStatusRequest(), metadata=METADATA, timeout=20) for _ in range(20))
        )
        assert {b.pending_count for s in first for b in s.backlog} == {1}
        # Written behind the server's back: the shared reading is still fresh.
        await pg.execute(f"INSERT INTO \"{schema}\".outbox (topic, payload) VALUES ('orders', '\\x78'::bytea)")
        again = await stub.GetStatus(pb.GetStatusRequest(), metadata=METADATA, timeout=20)
        assert [b.pending_count for b in again.backlog] == [1]
        # A change made through this server drops it.
        await stub.Pause(pb.PauseRequest(topic_pattern="other", reason="test"), metadata=METADATA, timeout=20)
        after = await stub.GetStatus(pb.GetStatusRequest(), metadata=METADATA, timeout=20)
        assert [b.pending_count for b in after.backlog] == [2]
        assert [p.topic_pattern for p in after.pauses] == ["other"]
