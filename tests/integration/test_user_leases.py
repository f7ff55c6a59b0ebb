"""clients.leases against real PostgreSQL: the user's own singleton-job leases (issue 15)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from clients import AsyncControlClient, HeldLease, LeaseLost, LeaseUnavailable, lease, lease_sync
from control.server import ControlServer
from tests.integration.control_server import ADMIN_TOKEN, READ_TOKEN, serving

JOB = "reconcile-invoices"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


async def _row(pool: asyncpg.Pool, schema: str, name: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f'SELECT holder, token, expires_at - now() AS left FROM "{schema}".distributed_locks WHERE name = $1', name
    )


async def test_acquire_renew_release(pool: asyncpg.Pool, schema: str) -> None:
    async with lease(pool, JOB, ttl=1.5, schema=schema, holder="job-a") as held:
        assert (held.name, held.holder, held.token) == (JOB, "job-a", 1)
        first = await _row(pool, schema, JOB)
        assert first is not None and first["holder"] == "job-a"
        await asyncio.sleep(2.5)  # longer than the ttl: only renewals keep it
        renewed = await _row(pool, schema, JOB)
        assert renewed is not None and renewed["holder"] == "job-a" and renewed["token"] == 1
        assert renewed["left"].total_seconds() > 0
        assert not held.lost.is_set()
    released = await _row(pool, schema, JOB)
    assert released is not None and released["holder"] is None and released["token"] == 1


async def test_someone_else_holds_it(pool: asyncpg.Pool, schema: str) -> None:
    async with lease(pool, JOB, ttl=5, schema=schema, holder="job-a"):
        with pytest.raises(LeaseUnavailable, match="held by 'job-a'") as refused:
            async with lease(pool, JOB, ttl=5, schema=schema, holder="job-b"):
                raise AssertionError("two holders")
        assert refused.value.holder == "job-a"
        with pytest.raises(LeaseUnavailable):
            async with lease(pool, JOB, ttl=5, schema=schema, wait=True, wait_timeout=0.5):
                raise AssertionError("two holders")


async def test_the_token_grows_on_every_change_of_hands(pool: asyncpg.Pool, schema: str) -> None:
    tokens = []
    for holder in ("job-a", "job-b", "job-a"):
        async with lease(pool, JOB, ttl=5, schema=schema, holder=holder) as held:
            tokens.append(held.token)
    assert tokens == [1, 2, 3]


async def test_wait_takes_over_once_released(pool: asyncpg.Pool, schema: str) -> None:
    order: list[str] = []

    async def second() -> int:
        async with lease(pool, JOB, ttl=5, schema=schema, holder="job-b", wait=True, retry_interval=0.05) as held:
            order.append("b")
            return held.token

    async with lease(pool, JOB, ttl=5, schema=schema, holder="job-a"):
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.5)
        order.append("a done")
    assert await asyncio.wait_for(waiter, 5) == 2
    assert order == ["a done", "b"]


@pytest.mark.parametrize("name", ["leader", "partition:0", "partition:15", "partition:x", "", " job", "a\x00b"])
async def test_reserved_and_bad_names(pool: asyncpg.Pool, schema: str, name: str) -> None:
    with pytest.raises(ValueError):
        lease(pool, name, schema=schema)
    with pytest.raises(ValueError):
        lease_sync("dbname=x", name, schema=schema)


async def test_bad_arguments(pool: asyncpg.Pool) -> None:
    for kwargs in ({"ttl": 0}, {"ttl": 0.1}, {"ttl": float("inf")}, {"ttl": float("nan")}, {"ttl": True}, {"schema": 'x"; DROP'}, {"holder": ""}):
        with pytest.raises(ValueError):
            lease(pool, JOB, **kwargs)  # type: ignore[arg-type]


async def test_a_lease_taken_over_cancels_the_body(pool: asyncpg.Pool, schema: str) -> None:
    reached_end = False
    started = time.monotonic()
    with pytest.raises(LeaseLost, match="taken over or released") as lost:
        async with lease(pool, JOB, ttl=1.5, schema=schema, holder="job-a") as held:
            # Someone steals it (as after a long pause past the ttl): the next renewal finds it taken.
            await pool.execute(
                f'UPDATE "{schema}".distributed_locks SET holder = $2, token = token + 1 WHERE name = $1', JOB, "thief"
            )
            await asyncio.sleep(30)
            reached_end = True
    assert not reached_end and held.lost.is_set() and lost.value.token == 1
    assert time.monotonic() - started < 5
    row = await _row(pool, schema, JOB)
    assert row is not None and row["holder"] == "thief"  # not released by the loser


async def test_an_outside_cancellation_stays_a_cancellation(pool: asyncpg.Pool, schema: str) -> None:
    async def body() -> None:
        async with lease(pool, JOB, ttl=5, schema=schema, holder="job-a"):
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await _row(pool, schema, JOB)
    assert row is not None and row["holder"] is None  # released


async def test_a_single_connection_works_too(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with lease(conn, JOB, ttl=1, schema=schema) as held:
            await asyncio.sleep(1.5)
            assert not held.lost.is_set()
        async with conn.transaction():
            with pytest.raises(ValueError, match="transaction"):
                async with lease(conn, JOB, ttl=1, schema=schema):
                    pass
    finally:
        await conn.close()


def test_sync_variant(database_url: str, schema: str) -> None:
    with psycopg.connect(database_url) as conn:  # not autocommit: the lease must not use its transaction
        with lease_sync(conn, JOB, ttl=1.5, schema=schema, holder="sync-a") as held:
            assert held.token == 1
            time.sleep(2.5)
            assert not held.lost.is_set()
            held.check()
            with pytest.raises(LeaseUnavailable), lease_sync(database_url, JOB, ttl=1.5, schema=schema):
                pass
            row = conn.execute(f'SELECT holder FROM "{schema}".distributed_locks WHERE name = %s', (JOB,)).fetchone()
            assert row == ("sync-a",)
        conn.rollback()
        row = conn.execute(f'SELECT holder FROM "{schema}".distributed_locks WHERE name = %s', (JOB,)).fetchone()
        assert row == (None,)
        # A factory works too, and the token grew.
        with lease_sync(lambda: psycopg.connect(database_url), JOB, ttl=1.5, schema=schema) as again:
            assert again.token == 2


def test_sync_variant_signals_a_loss(database_url: str, schema: str) -> None:
    with pytest.raises(LeaseLost), lease_sync(database_url, JOB, ttl=1.5, schema=schema, holder="sync-a") as held:
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute(f'UPDATE "{schema}".distributed_locks SET holder = %s, token = token + 1', ("thief",))
        assert held.lost.wait(5)
        with pytest.raises(LeaseLost):
            held.check()
    assert threading.active_count() < 50


# --- the control plane ---------------------------------------------------------------------------


@pytest.fixture
async def server(database_url: str, schema: str) -> AsyncIterator[ControlServer]:
    async for running in serving(database_url, schema):
        yield running


async def test_listed_and_force_released_through_the_control_plane(
    pool: asyncpg.Pool, schema: str, server: ControlServer
) -> None:
    addr = f"127.0.0.1:{server.port}"
    held: HeldLease | None = None
    with pytest.raises(LeaseLost):
        async with lease(pool, JOB, ttl=1.5, schema=schema, holder="job-a") as held:
            async with AsyncControlClient(addr, token=READ_TOKEN) as reader:
                locks = {lock.name: lock for lock in await reader.locks()}
            assert (locks[JOB].holder, locks[JOB].token, locks[JOB].expired) == ("job-a", held.token, False)
            async with AsyncControlClient(addr, token=ADMIN_TOKEN, operator="ops") as admin:
                released = await admin.release_lock(JOB, expected_holder="job-a", expected_token=held.token)
            assert released.holder is None
            await asyncio.sleep(30)  # the next renewal (within ttl / 3) fails: the body is cancelled
    assert held is not None and held.lost.is_set()
    audit = await pool.fetchval(
        f"SELECT count(*) FROM \"{schema}\".audit_log WHERE arguments::text LIKE '%' || $1 || '%'", JOB
    )
    assert audit >= 1


class _Counter:
    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, amount: int, attributes: dict[str, str]) -> None:
        self.added.extend([attributes["lease"]] * amount)


async def test_metrics_per_lease_name(pool: asyncpg.Pool, schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counters = {kind: _Counter() for kind in ("acquisitions", "failures", "losses")}
    monkeypatch.setattr("clients.leases._counters", counters)
    async with lease(pool, JOB, ttl=1.5, schema=schema, holder="job-a"):
        with pytest.raises(LeaseUnavailable):
            async with lease(pool, JOB, ttl=1.5, schema=schema):
                pass
    with pytest.raises(LeaseLost):
        async with lease(pool, "other-job", ttl=1.5, schema=schema):
            await pool.execute(f'UPDATE "{schema}".distributed_locks SET holder = NULL WHERE name = $1', "other-job")
            await asyncio.sleep(30)
    assert {kind: c.added for kind, c in counters.items()} == {
        "acquisitions": [JOB, "other-job"], "failures": [JOB], "losses": ["other-job"]}
