"""A DBA's routine actions against real relay processes: cancelled queries, tables locked past a
role-level `lock_timeout`, and a permanent error that no retry repairs.

The relays log in as a role of their own (as in production: not the superuser), whose
`lock_timeout` is set on the role, so the relays' sessions get it without knowing. The first two
kinds are transient (docs/operations.md, "Fault model"): the relays stay up and deliver everything
in per-key order. The third is broken: the relay must exit with a non-zero code, so a supervisor
(`Restart=on-failure`, Kubernetes) restarts it and the operator is told."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    Written,
    check_delivery,
    create_kafka_topic,
    read_kafka,
    read_redis,
    relay_env,
    relay_logs,
    running,
    wait_until,
    write_events,
)
from tests.acceptance.test_relay_failures import alive, all_partitions_held, dead_letters, drained

pytestmark = pytest.mark.slow
RELAY_TABLES = ("outbox", "distributed_locks", "relay_instances", "pauses", "dead_letter_archive")
# Trust authentication ignores it, but it lets the test check that no log line or error shows it.
PASSWORD = "s3cr3t-relay-pw"


@dataclass(frozen=True)
class RelayRole:
    name: str
    url: str


def url_for_role(database_url: str, role: str) -> str:
    parts = urlsplit(database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{role}:{PASSWORD}@{host}", *parts[2:]))


@pytest.fixture
async def relay_role(database_url: str, schema: str) -> AsyncIterator[RelayRole]:
    """A login role with what a relay needs on `schema` and `lock_timeout = 200ms` set on it."""
    name = f"relay_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE ROLE "{name}" LOGIN')
        await conn.execute(f"ALTER ROLE \"{name}\" SET lock_timeout = '200ms'")
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{name}"')
        await conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{schema}" TO "{name}"')
        await conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{name}"')
        probe = await asyncpg.connect(url_for_role(database_url, name))
        try:
            assert await probe.fetchval("SHOW lock_timeout") == "200ms"
        finally:
            await probe.close()
        yield RelayRole(name, url_for_role(database_url, name))
    finally:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
        await conn.execute(f'DROP OWNED BY "{name}"')
        await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        await conn.close()


def role_fleet(stack: StackEndpoints, schema: str, role: RelayRole, tmp: Path, **extra: str) -> Fleet:
    env = relay_env(
        role.url, schema, stack.kafka_bootstrap, stack.redis_url, OUTBOX_ROUTES="rt.*=redis", **extra
    )
    # The harness reads and writes as the superuser; only the relays run as the role.
    return Fleet(stack.database_url, schema, tmp, env)


async def delivered_in_order(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], written: list[Written]
) -> None:
    await drained(fleet, timeout=90)
    received = await read_kafka(stack.kafka_bootstrap, topics["kafka"]) + await read_redis(
        stack.redis_url, topics["redis"]
    )
    result = check_delivery(written, received)
    assert result["delivered"] == len(written), result
    assert await dead_letters(fleet) == [], "a database fault must not dead-letter anything"


def no_secret_in_logs(fleet: Fleet) -> None:
    assert PASSWORD not in relay_logs(fleet)


# -- (a) a storm of cancelled queries ------------------------------------------------------------


async def test_relays_ride_out_a_storm_of_cancelled_queries(
    stack: StackEndpoints, schema: str, relay_role: RelayRole, topics: dict[str, str], tmp_path: Path
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    fleet = role_fleet(stack, schema, relay_role, tmp_path)
    with running(fleet):
        for n in range(2):
            fleet.spawn(f"relay-{n}")
        await all_partitions_held(fleet)
        writing = asyncio.create_task(
            write_events(stack.database_url, schema, list(topics.values()), total=3_000, keys=200, pace=0.03)
        )
        admin = await asyncpg.connect(stack.database_url)
        cancelled = 0
        try:
            storm_ends = time.monotonic() + 10
            while time.monotonic() < storm_ends:
                cancelled += await admin.fetchval(
                    """SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_stat_activity
                       WHERE application_name LIKE 'outbox-relay%' AND state = 'active'
                         AND pid <> pg_backend_pid()"""
                )
                await asyncio.sleep(0.002)
        finally:
            await admin.close()
        alive(fleet)
        assert cancelled > 50, f"only {cancelled} relay queries cancelled: was the storm real?"
        written = await writing
        await delivered_in_order(stack, fleet, topics, written)
        alive(fleet)
        await all_partitions_held(fleet, timeout=15)
        no_secret_in_logs(fleet)
        print(f"cancelled {cancelled} relay queries")


# -- (b) each relay table locked past lock_timeout -----------------------------------------------


async def test_relays_ride_out_tables_locked_past_lock_timeout(
    stack: StackEndpoints, schema: str, relay_role: RelayRole, topics: dict[str, str], tmp_path: Path
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    fleet = role_fleet(stack, schema, relay_role, tmp_path)
    with running(fleet):
        for n in range(2):
            fleet.spawn(f"relay-{n}")
        await all_partitions_held(fleet)
        writing = asyncio.create_task(
            write_events(stack.database_url, schema, list(topics.values()), total=2_000, keys=200, pace=0.1)
        )
        admin = await asyncpg.connect(stack.database_url)
        try:
            for table in RELAY_TABLES:
                async with admin.transaction():
                    await admin.execute(f'LOCK TABLE "{schema}".{table} IN ACCESS EXCLUSIVE MODE')
                    await asyncio.sleep(3)  # 15 x the relays' lock_timeout, and past a lease renewal
                alive(fleet)
        finally:
            await admin.close()
        written = await writing
        await delivered_in_order(stack, fleet, topics, written)
        alive(fleet)
        await all_partitions_held(fleet, timeout=15)
        logs = relay_logs(fleet)
        assert "LockNotAvailableError" in logs or "lock timeout" in logs, logs
        no_secret_in_logs(fleet)


# -- (c) a permanent error ends the process with a failure ---------------------------------------


async def test_a_relay_that_cannot_work_exits_non_zero(
    stack: StackEndpoints, schema: str, relay_role: RelayRole, tmp_path: Path
) -> None:
    fleet = role_fleet(
        stack, schema, relay_role, tmp_path, OUTBOX_DEFAULT_SINK="redis", OUTBOX_SUPERVISOR_GIVE_UP="2"
    )
    with running(fleet):
        relay = fleet.spawn("relay-0")
        await all_partitions_held(fleet)
        admin = await asyncpg.connect(stack.database_url)
        try:
            # No retry repairs this: every coordination round now fails with insufficient_privilege
            # on its heartbeat (an upsert), while a shutdown could still release leases cleanly.
            await admin.execute(f'REVOKE INSERT ON "{schema}".relay_instances FROM "{relay_role.name}"')
        finally:
            await admin.close()

        async def exited() -> bool:
            return not relay.alive()

        await wait_until(exited, 60, what="the relay to give up")
        code = relay.wait()
        output = relay.log()
        assert code != 0, f"a relay that gave up must not exit 0:\n{output[-4000:]}"
        assert code == 1, output[-4000:]
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output[-4000:]
        assert "InsufficientPrivilege" in errors[0] or "permission denied" in errors[0], errors
        assert "Traceback" not in errors[0]
        assert PASSWORD not in output
        # The failures before the give-up were logged with their traceback.
        assert "Traceback" in output, output[-4000:]
