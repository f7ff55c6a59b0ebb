"""Failure injection against real relay processes: broker and database outages, poison events,
retries, frozen relays and pauses. Everything is checked from the outside: what reached the
brokers, what is left in the outbox and what was dead-lettered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from devtools.embedded import EmbeddedStack, StackEndpoints
from devtools.fleet import (
    Fleet,
    Received,
    RelayProcess,
    Written,
    all_obey,
    check_delivery,
    create_kafka_topic,
    leases_by_holder,
    pending_count,
    published_count,
    read_kafka,
    read_redis,
    relay_env,
    relay_logs,
    running,
    unique_name,
    wait_until,
    write_events,
)
from relay import migrate
from tests.conftest import settings_for

pytestmark = pytest.mark.slow
PARTITIONS = 16
BATCH = 200  # OUTBOX_BATCH_SIZE in relay_env


# -- helpers -------------------------------------------------------------------------------------


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def dead_letters(fleet: Fleet) -> list[asyncpg.Record]:
    return await fetch(fleet.database_url, f'SELECT * FROM "{fleet.schema}".dead_letter_archive ORDER BY id')


async def partition_counts(fleet: Fleet) -> dict[str, int]:
    held = await leases_by_holder(fleet.database_url, fleet.schema)
    counts = {h: len([n for n in names if n.startswith("partition:")]) for h, names in held.items()}
    return {h: c for h, c in counts.items() if c}


async def all_partitions_held(fleet: Fleet, timeout: float = 30) -> None:
    await fleet.wait_partitions(timeout)


async def drained(fleet: Fleet, timeout: float = 60) -> float:
    return await fleet.wait_drained(timeout)


async def insert_events(
    database_url: str, schema: str, events: Sequence[tuple[str, str | None, bytes]]
) -> list[Written]:
    """Plain SQL, as any language would write (and without the writer's payload limit).
    One statement, in one transaction: ids follow the order given."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f"""INSERT INTO "{schema}".outbox (topic, key, payload)
                SELECT e.topic, e.key, e.payload
                FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY
                     AS e(topic, key, payload, n)
                ORDER BY e.n
                RETURNING id, message_id, topic, key""",
            [t for t, _, _ in events],
            [k for _, k, _ in events],
            [p for _, _, p in events],
        )
    finally:
        await conn.close()
    written = sorted(
        (Written(r["id"], str(r["message_id"]), r["topic"], r["key"] or "") for r in rows), key=lambda w: w.id
    )
    assert [(w.topic, w.key or None) for w in written] == [(t, k) for t, k, _ in events]
    return written


async def keys_in_partition_of(database_url: str, key: str, count: int) -> list[str]:
    """Other keys that land in the same partition as `key` (the outbox's own formula)."""
    rows = await fetch(
        database_url,
        """SELECT k FROM (SELECT 'n' || g AS k, g FROM generate_series(0, 5000) g) s
           WHERE (hashtext(k)::bigint & 2147483647) % $1 = (hashtext($2)::bigint & 2147483647) % $1
           ORDER BY g LIMIT $3""",
        PARTITIONS,
        key,
        count,
    )
    return [r["k"] for r in rows]


def message_ids(received: Sequence[Received]) -> list[str]:
    return [r.message_id for r in received]


def logged(relay: RelayProcess, *phrases: str) -> bool:
    text = relay.log()
    return any(phrase in text for phrase in phrases)


def alive(fleet: Fleet) -> None:
    dead = [
        (r.instance_id, r.process.returncode if r.process else None) for r in fleet.relays if not r.alive()
    ]
    assert not dead, f"relays exited: {dead}\n{relay_logs(fleet)}"


async def read_both(kafka: str, redis_url: str, topics: dict[str, str]) -> list[Received]:
    return await read_kafka(kafka, topics["kafka"]) + await read_redis(redis_url, topics["redis"])


# -- 1. broker outage under load -----------------------------------------------------------------


async def test_kafka_and_redis_outage_under_load_loses_nothing(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    """Redis really stopped, the Kafka broker frozen (Tansu keeps data in memory only, so a frozen
    broker stands in for an unreachable one), for 20 s while writers keep committing."""
    stack = EmbeddedStack(postgres=False, redis_persistent=True)
    endpoints = await asyncio.to_thread(stack.start)
    frozen: int | None = None
    try:
        topics = {"kafka": unique_name("kt."), "redis": unique_name("rt.")}
        await create_kafka_topic(endpoints.kafka_bootstrap, topics["kafka"])
        env = relay_env(
            database_url,
            schema,
            endpoints.kafka_bootstrap,
            endpoints.redis_url,
            OUTBOX_ROUTES="rt.*=redis",
            OUTBOX_SINK_BACKOFF_MAX="2",
        )
        fleet = Fleet(database_url, schema, tmp_path, env)
        with running(fleet):
            for n in range(2):
                fleet.spawn(f"relay-{n}")
            await all_partitions_held(fleet)
            # ~5000 events over 200 keys, paced over ~30 s.
            writing = asyncio.create_task(
                write_events(database_url, schema, list(topics.values()), total=5_000, keys=200, pace=0.25)
            )

            async def flowing() -> bool:
                return len(await read_redis(endpoints.redis_url, topics["redis"])) >= 100

            await wait_until(flowing, 15, what="events to flow before the outage")
            await asyncio.to_thread(stack.stop_redis)
            frozen = stack.pids()["kafka"]
            os.kill(frozen, signal.SIGSTOP)
            await asyncio.sleep(20)
            backlog = await pending_count(database_url, schema)
            assert backlog > 500, f"only {backlog} events pending: was the outage real?"
            alive(fleet)
            os.kill(frozen, signal.SIGCONT)
            frozen = None
            await asyncio.to_thread(stack.start_redis)

            written = await writing
            assert len(written) == 5_000
            took = await drained(fleet, timeout=60)
            received = await read_both(endpoints.kafka_bootstrap, endpoints.redis_url, topics)
            # At least once: a publish the frozen broker never answered stays with its worker
            # (not re-sent), so copies are bounded by one unacknowledged batch per partition.
            result = check_delivery(written, received)
            print("outage delivery:", result)
            assert result["delivered"] == 5_000
            assert result["duplicates"] <= 16 * 200, result
            assert await dead_letters(fleet) == [], "an outage must not dead-letter anything"
            alive(fleet)
            assert took < 45, f"recovery took {took:.0f}s"
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        await asyncio.to_thread(stack.stop)


# -- 2. PostgreSQL restart -----------------------------------------------------------------------


async def test_relays_ride_out_a_postgres_restart(tmp_path: Path) -> None:
    stack = EmbeddedStack(kafka=False, redis=True)
    endpoints = await asyncio.to_thread(stack.start)
    try:
        url, schema = endpoints.database_url, "relay_pg_restart"
        await asyncio.to_thread(migrate.upgrade, settings_for(url, schema))
        stream = unique_name("rt.")
        env = relay_env(url, schema, "", endpoints.redis_url, OUTBOX_DEFAULT_SINK="redis")
        fleet = Fleet(url, schema, tmp_path, env)
        with running(fleet):
            for n in range(2):
                fleet.spawn(f"relay-{n}")
            await all_partitions_held(fleet)
            before = await write_events(url, schema, [stream], total=2_000, keys=100)

            async def some_delivered() -> bool:
                return len(await read_redis(endpoints.redis_url, stream)) > 0

            await wait_until(some_delivered, 10, interval=0.05, what="delivery to start")
            await asyncio.to_thread(stack.stop_postgres)  # probably mid-drain
            await asyncio.sleep(5)
            alive(fleet)
            await asyncio.to_thread(stack.start_postgres)
            after = await write_events(url, schema, [stream], total=2_000, keys=100)

            await drained(fleet, timeout=60)
            result = check_delivery(before + after, await read_redis(endpoints.redis_url, stream))
            assert result["delivered"] == 4_000
            alive(fleet)
            for relay in fleet.relays:
                assert logged(
                    relay, "database error", "coordination round failed", "listen connection lost"
                ), f"{relay.instance_id} never noticed the outage:\n{relay.log()[-3000:]}"
            await all_partitions_held(fleet, timeout=15)
    finally:
        await asyncio.to_thread(stack.stop)


# -- 3. a poison event ---------------------------------------------------------------------------


async def test_an_event_the_broker_refuses_is_dead_lettered_without_blocking_others(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    topic = topics["kafka"]
    await create_kafka_topic(stack.kafka_bootstrap, topic)
    # Our own limit is above the payload, so Kafka's 1 MiB max request size is what refuses it.
    for n in range(2):
        fleet.spawn(f"relay-{n}", OUTBOX_MAX_PAYLOAD_BYTES="5000000")
    await all_partitions_held(fleet)

    events: list[tuple[str, str | None, bytes]] = [(topic, "poison", b"p" * 2_000_000)]
    events += [(topic, "poison", f"after-{n}".encode()) for n in range(3)]
    events += [(topic, f"o{n % 50}", f"other-{n}".encode()) for n in range(500)]
    written = await insert_events(fleet.database_url, fleet.schema, events)
    poison, followers, others = written[0], written[1:4], written[4:]

    took = await drained(fleet, timeout=30)
    assert took < 8, f"other events waited {took:.1f}s behind the poison event"

    [entry] = await dead_letters(fleet)
    assert entry["outbox_id"] == poison.id
    assert str(entry["message_id"]) == poison.message_id
    assert entry["reason"] == "record_too_large"
    assert entry["last_error"] and "TooLarge" in entry["last_error"], entry["last_error"]
    assert len(entry["payload"]) == 2_000_000

    received = await read_kafka(stack.kafka_bootstrap, topic)
    assert poison.message_id not in message_ids(received)
    result = check_delivery(followers + others, received)
    assert result == {"delivered": 503, "duplicates": 0}
    arrived = [r.message_id for r in received if r.key == "poison"]
    assert arrived == [w.message_id for w in followers], "the poison key's later events, in id order"


# -- 4. retries keep per-key order and block only their key --------------------------------------


async def broken_stream(redis_url: str) -> tuple[str, aioredis.Redis]:
    """A topic whose Redis stream cannot be written: a plain string holds its name (WRONGTYPE)."""
    name = unique_name("rt.bad.")
    client = aioredis.from_url(redis_url)
    await client.set(name, "x")
    return name, client


async def attempts_of(fleet: Fleet, topic: str) -> list[tuple[int, int]]:
    rows = await fetch(
        fleet.database_url,
        f'SELECT id, attempts FROM "{fleet.schema}".outbox WHERE topic = $1 ORDER BY id',
        topic,
    )
    return [(r["id"], r["attempts"]) for r in rows]


async def test_a_retried_event_holds_back_its_key_and_nothing_else(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    bad, client = await broken_stream(stack.redis_url)
    try:
        await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
        for n in range(2):
            fleet.spawn(
                f"relay-{n}", OUTBOX_MAX_ATTEMPTS="20", OUTBOX_BACKOFF_INITIAL="0.2", OUTBOX_BACKOFF_MAX="1"
            )
        await all_partitions_held(fleet)
        neighbours = await keys_in_partition_of(fleet.database_url, "k-bad", 5)
        events: list[tuple[str, str | None, bytes]] = []
        for n in range(3):
            events.append((bad, "k-bad", f"bad-{n}".encode()))
            # Same partition, other keys; and the same key on another topic (another ordering key).
            events += [(topics["redis"], key, b"n") for key in neighbours]
            events += [(topics["kafka"], key, b"n") for key in neighbours]
            events.append((topics["redis"], "k-bad", b"same key, other topic"))
            events += [(topics[t], f"o{i}", b"o") for i in range(60) for t in ("kafka", "redis")]
        written = await insert_events(fleet.database_url, fleet.schema, events)
        bad_events = [w for w in written if w.topic == bad]
        others = [w for w in written if w.topic != bad]

        async def retried_twice() -> bool:
            rows = await attempts_of(fleet, bad)
            return bool(rows) and rows[0][1] >= 2

        await wait_until(retried_twice, 20, what="the first k-bad event to be retried")
        rows = await attempts_of(fleet, bad)
        assert [i for i, _ in rows] == [w.id for w in bad_events]
        assert [a for _, a in rows[1:]] == [0, 0], f"later k-bad events must wait untried: {rows}"

        async def others_delivered() -> bool:
            return await pending_count(fleet.database_url, fleet.schema) == 3

        await wait_until(others_delivered, 20, what="every other event to be delivered")
        received = await read_both(stack.kafka_bootstrap, stack.redis_url, topics)
        assert check_delivery(others, received)["delivered"] == len(others)
        rows = await attempts_of(fleet, bad)
        assert rows[0][1] >= 2 and [a for _, a in rows[1:]] == [0, 0], rows

        await client.delete(bad)
        await drained(fleet, timeout=20)
        arrived = await read_redis(stack.redis_url, bad)
        assert message_ids(arrived) == [w.message_id for w in bad_events], "k-bad events in id order"
        assert await dead_letters(fleet) == []
    finally:
        await client.aclose()


async def test_an_exhausted_event_is_dead_lettered_and_its_key_moves_on(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    bad, client = await broken_stream(stack.redis_url)
    try:
        for n in range(2):
            # A slow backoff leaves time to repair the stream between the first dead letter and
            # the second event's last attempt.
            fleet.spawn(
                f"relay-{n}", OUTBOX_MAX_ATTEMPTS="2", OUTBOX_BACKOFF_INITIAL="2", OUTBOX_BACKOFF_MAX="4"
            )
        await all_partitions_held(fleet)
        events: list[tuple[str, str | None, bytes]] = [(bad, "k-bad", f"bad-{n}".encode()) for n in range(3)]
        events += [(topics["redis"], f"o{n % 20}", b"o") for n in range(100)]
        written = await insert_events(fleet.database_url, fleet.schema, events)
        first, later = written[0], written[1:3]

        async def archived() -> bool:
            return bool(await dead_letters(fleet))

        await wait_until(archived, 20, interval=0.05, what="the first k-bad event to be dead-lettered")
        await client.delete(bad)

        [entry] = await dead_letters(fleet)
        assert entry["outbox_id"] == first.id
        assert entry["reason"] == "max_attempts"
        assert entry["attempts"] == 2
        assert "WRONGTYPE" in (entry["last_error"] or ""), entry["last_error"]

        await drained(fleet, timeout=20)
        assert message_ids(await read_redis(stack.redis_url, bad)) == [w.message_id for w in later]
        check_delivery(written[3:], await read_redis(stack.redis_url, topics["redis"]))
        assert len(await dead_letters(fleet)) == 1
    finally:
        await client.aclose()


# -- 5. fencing a frozen relay -------------------------------------------------------------------


async def test_a_frozen_relay_is_fenced_off_and_the_fleet_rebalances(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    ttl, frozen_for = 3.0, 8.0  # relay_env sets OUTBOX_LEASE_TTL=3
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    a, b = fleet.spawn("relay-a"), fleet.spawn("relay-b")

    async def split(expected: dict[str, int]) -> bool:
        return await partition_counts(fleet) == expected

    await wait_until(lambda: split({a.instance_id: 8, b.instance_id: 8}), 30, what="an 8/8 split")
    writing = asyncio.create_task(
        write_events(fleet.database_url, fleet.schema, list(topics.values()), total=3_000, keys=200, pace=0.2)
    )

    async def flowing() -> bool:
        return await published_count(fleet.database_url, fleet.schema) >= 100

    await wait_until(flowing, 30, interval=0.1, what="events to flow before A is frozen")
    a.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        await wait_until(
            lambda: split({b.instance_id: PARTITIONS}), ttl + ttl / 3 + 3, interval=0.1, what="takeover by B"
        )
        assert time.monotonic() - frozen_at < frozen_for, "the takeover must happen while A is frozen"
        await asyncio.sleep(frozen_for - (time.monotonic() - frozen_at))
    finally:
        a.signal(signal.SIGCONT)

    async def noticed() -> bool:
        return logged(a, "lease lost", "lease may have lapsed", "lost before settling")

    await wait_until(noticed, 10, what="A to notice its lost leases")
    await wait_until(lambda: split({a.instance_id: 8, b.instance_id: 8}), 20, what="an 8/8 split again")
    written = await writing
    await drained(fleet)
    result = check_delivery(written, await read_both(stack.kafka_bootstrap, stack.redis_url, topics))
    assert result["delivered"] == 3_000
    # Only batches A had in flight when it froze may arrive twice: at most one per partition.
    assert result["duplicates"] <= PARTITIONS * BATCH, result
    alive(fleet)


# -- 6. pause and resume through the database ----------------------------------------------------


async def test_pauses_written_to_the_database_stop_and_resume_publishing(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    relays = [fleet.spawn(f"relay-{n}") for n in range(2)]
    await all_partitions_held(fleet)
    conn = await asyncpg.connect(fleet.database_url)
    pauses = f'"{fleet.schema}".pauses'
    written: list[Written] = []

    async def write(count: int, *which: str) -> list[Written]:
        new = await write_events(
            fleet.database_url, fleet.schema, [topics[t] for t in which], total=count, keys=50
        )
        written.extend(new)
        return new

    async def received() -> list[Received]:
        return await read_both(stack.kafka_bootstrap, stack.redis_url, topics)

    try:
        # Everything paused: nothing written afterwards leaves the outbox until the pause goes.
        await conn.execute(
            f"INSERT INTO {pauses} (topic_pattern, reason, paused_by) VALUES ('*', 'test', 'tester')"
        )
        await all_obey(relays, {"*"}, timeout=1.5)
        held_back = await write(300, "kafka", "redis")
        await asyncio.sleep(3)
        assert not {w.message_id for w in held_back} & set(message_ids(await received()))
        assert await pending_count(fleet.database_url, fleet.schema) == 300
        await conn.execute(f"DELETE FROM {pauses} WHERE topic_pattern = '*'")
        await all_obey(relays, set(), timeout=3)
        assert await drained(fleet, timeout=10) < 5
        check_delivery(written, await received())

        # Only the Kafka topics paused: the Redis stream keeps flowing.
        await conn.execute(
            f"INSERT INTO {pauses} (topic_pattern, reason, paused_by) VALUES ('kt.*', 'test', 'tester')"
        )
        await all_obey(relays, {"kt.*"}, timeout=3)
        new = await write(400, "kafka", "redis")
        to_redis = [w for w in new if w.topic == topics["redis"]]
        to_kafka = [w for w in new if w.topic == topics["kafka"]]
        assert to_redis and to_kafka

        async def redis_delivered() -> bool:
            arrived = set(message_ids(await read_redis(stack.redis_url, topics["redis"])))
            return {w.message_id for w in to_redis} <= arrived

        await wait_until(redis_delivered, 10, what="the unpaused Redis stream to be delivered")

        async def pending_by_topic() -> dict[str, int]:
            rows = await fetch(
                fleet.database_url, f'SELECT topic, count(*) AS n FROM "{fleet.schema}".outbox GROUP BY topic'
            )
            return {r["topic"]: r["n"] for r in rows}

        async def redis_settled() -> bool:  # marked done up to OUTBOX_SETTLE_DELAY after the ack
            return topics["redis"] not in await pending_by_topic()

        await wait_until(redis_settled, 10, what="the delivered Redis events marked done")
        assert await pending_by_topic() == {topics["kafka"]: len(to_kafka)}
        kafka_arrived = set(message_ids(await read_kafka(stack.kafka_bootstrap, topics["kafka"])))
        assert not {w.message_id for w in to_kafka} & kafka_arrived
        await conn.execute(f"DELETE FROM {pauses} WHERE topic_pattern = 'kt.*'")
        await all_obey(relays, set(), timeout=3)
        await drained(fleet, timeout=10)
        check_delivery(written, await received())

        # A pause that expires lifts itself.
        await conn.execute(
            f"INSERT INTO {pauses} (topic_pattern, reason, paused_by, expires_at) "
            "VALUES ('*', 'test', 'tester', now() + interval '2 seconds')"
        )
        paused_at = time.monotonic()
        await all_obey(relays, {"*"}, timeout=1.5)
        await write(100, "kafka", "redis")
        await asyncio.sleep(max(0.0, paused_at + 1.0 - time.monotonic()))
        assert await pending_count(fleet.database_url, fleet.schema) == 100
        await drained(fleet, timeout=10)
        assert time.monotonic() - paused_at >= 2.0
        await all_obey(relays, set(), timeout=3)
        result = check_delivery(written, await received())
        assert result == {"delivered": 800, "duplicates": 0}
        assert await conn.fetchval(f"SELECT count(*) FROM {pauses}") == 1, "the expired row stays"
    finally:
        await conn.close()
