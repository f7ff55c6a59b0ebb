"""Raw ceilings: the same work as the relay without the relay, with the same payloads.

(a) Postgres drain: DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) RETURNING
    in a loop over asyncpg; (b) raw produce: aiokafka send() then gather, in chunks; (c) raw Redis:
    pipelined XADD; (d) writer ceiling: concurrent single-row committing transactions.

Beside (b) and (c), the same messages sent the way the relay sends them (record batches built by the
client; one script call per chunk of XADDs): not the bars, they show what the client could do
faster than its plain API."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench import workload
from bench.stack import Servers, create_topic, delete_topic, fresh_schema
from clients.writer import aenqueue
from devtools.fleet import redis_delete
from relay.sinks.kafka_batches import KeyPartitioner
from relay.sinks.redis import XADD_BATCH_SCRIPT, script_args


def producer_options(bootstrap: str) -> dict[str, object]:
    """The relay's own producer settings at their defaults (relay/sinks/kafka.py)."""
    return {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 1_048_576,
        "max_request_size": 1_048_576,
        "enable_idempotence": False,
    }


def tuned_producer_options(bootstrap: str) -> dict[str, object]:
    """A raw producer tuned for throughput (issue 16's bar for the drain): 256 KiB batches, linger 5 ms."""
    return {**producer_options(bootstrap), "max_batch_size": 262_144, "linger_ms": 5}


async def pg_drain(servers: Servers, size: int, rows: int, batch: int = 500, loops: int = 4) -> float:
    """Rows/s that `loops` concurrent DELETE ... SKIP LOCKED ... RETURNING loops take out of a
    backlog of `rows` (the rows come back to Python, as they do for the relay)."""
    async with fresh_schema(servers.db) as schema:
        pool = await asyncpg.create_pool(servers.db, min_size=loops, max_size=loops)
        try:
            async with pool.acquire() as conn:
                await workload.bulk_insert(conn, schema, "bench.raw", rows, size)
                await conn.execute(f'/* bench */ VACUUM ANALYZE "{schema}".outbox')
            statement = (
                f'/* bench */ DELETE FROM "{schema}".outbox WHERE id IN ('
                f'SELECT id FROM "{schema}".outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) '
                "RETURNING id, message_id, topic, key, payload, headers::text, created_at, attempts"
            )
            taken = 0

            async def loop() -> None:
                nonlocal taken
                while True:
                    records = await pool.fetch(statement, batch)
                    if not records:
                        return
                    taken += len(records)

            started = time.perf_counter()
            await asyncio.gather(*(loop() for _ in range(loops)))
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
    return taken / elapsed


KafkaMessage = tuple[bytes, bytes, list[tuple[str, bytes]]]
KafkaChunk = Callable[[AIOKafkaProducer, str, list[int], list[KafkaMessage]], Awaitable[None]]


async def _timed_kafka(
    servers: Servers,
    size: int,
    count: int,
    chunk: int,
    send: KafkaChunk,
    options: dict[str, object] | None = None,
) -> float:
    """Messages/s of `send` over `count` messages in chunks of `chunk`: same payloads, keys and
    headers as the relay's, the relay's producer settings (or `options`), a fresh 8-partition topic."""
    topic = await create_topic(servers.kafka, "bench.raw")
    messages = [
        (workload.key(n).encode(), workload.payload(n, size), workload.kafka_headers()) for n in range(count)
    ]
    producer = AIOKafkaProducer(**(options or producer_options(servers.kafka)))
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        started = time.perf_counter()
        for first in range(0, count, chunk):
            await send(producer, topic, partitions, messages[first : first + chunk])
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
        await delete_topic(servers.kafka, topic)
    return count / elapsed


async def _send_and_gather(
    producer: AIOKafkaProducer, topic: str, _partitions: list[int], messages: list[KafkaMessage]
) -> None:
    futures = [
        await producer.send(topic, value=value, key=key, headers=headers) for key, value, headers in messages
    ]
    await asyncio.gather(*futures)


async def _send_built_batches(
    partitioner: KeyPartitioner,
    producer: AIOKafkaProducer,
    topic: str,
    partitions: list[int],
    messages: list[KafkaMessage],
) -> None:
    builders: dict[int, Any] = {}
    acknowledgements = []
    for key, value, headers in messages:
        partition = partitioner.partition(key, partitions, partitions)
        builder = builders.get(partition)
        if builder is None or builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            if builder is not None:
                acknowledgements.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            builder.append(timestamp=None, key=key, value=value, headers=headers)
    for partition, builder in builders.items():
        acknowledgements.append(await producer.send_batch(builder, topic, partition=partition))
    await asyncio.gather(*acknowledgements)


async def kafka_produce(servers: Servers, size: int, count: int, chunk: int = 2000) -> float:
    """Messages/s aiokafka gets acknowledged: send() `chunk` messages, gather their futures, repeat."""
    return await _timed_kafka(servers, size, count, chunk, _send_and_gather)


async def kafka_produce_tuned(servers: Servers, size: int, count: int, chunk: int = 2000) -> float:
    """Messages/s of the plain send() loop with a producer tuned for throughput (256 KiB batches,
    linger 5 ms): the raw producer issue 16 measures the drain against."""
    options = tuned_producer_options(servers.kafka)
    return await _timed_kafka(servers, size, count, chunk, _send_and_gather, options)


async def kafka_produce_batches(servers: Servers, size: int, count: int, chunk: int = 2000) -> float:
    """Messages/s when the client builds the record batches (create_batch / send_batch), one per
    partition per `chunk` messages, keys partitioned as send() would (murmur2)."""
    # One partitioner for the run, as the relay keeps one: its key-hash cache outlives a chunk.
    return await _timed_kafka(servers, size, count, chunk, partial(_send_built_batches, KeyPartitioner()))


RedisEntries = list[dict[str, bytes | str]]
RedisChunk = Callable[[aioredis.Redis, str, RedisEntries], Awaitable[object]]


async def _timed_redis(servers: Servers, size: int, count: int, chunk: int, send: RedisChunk) -> float:
    """Entries/s of `send` over `count` entries with the relay's stream fields, `chunk` at a time."""
    stream = f"bench.raw.{time.monotonic_ns()}"
    entries = [workload.redis_fields(n, size) for n in range(count)]
    client = aioredis.from_url(servers.redis)
    try:
        await client.ping()
        started = time.perf_counter()
        for first in range(0, count, chunk):
            await send(client, stream, entries[first : first + chunk])
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
        await redis_delete(servers.redis, stream)
    return count / elapsed


async def _xadd_pipeline(client: aioredis.Redis, stream: str, entries: RedisEntries) -> object:
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
    return await pipe.execute()


async def _xadd_script(client: aioredis.Redis, stream: str, entries: RedisEntries) -> object:
    script = client.register_script(XADD_BATCH_SCRIPT)  # loads it once (NOSCRIPT), then EVALSHA
    streams, args = script_args(None, ((stream, fields) for fields in entries))
    return await script(keys=streams, args=args)


async def redis_xadd(servers: Servers, size: int, count: int, chunk: int = 2000) -> float:
    """Entries/s of pipelined XADD (redis.asyncio, no transaction) with the relay's stream fields."""
    return await _timed_redis(servers, size, count, chunk, _xadd_pipeline)


async def redis_script(servers: Servers, size: int, count: int, chunk: int = 2000) -> float:
    """Entries/s of the relay's XADD script (relay/sinks/redis.py), `chunk` entries per call."""
    return await _timed_redis(servers, size, count, chunk, _xadd_script)


async def writer_commits(servers: Servers, concurrency: int, seconds: float, size: int = 200) -> float:
    """Commits/s of `concurrency` tasks each committing single-event transactions through the writer
    API (clients.aenqueue on asyncpg) as fast as they can for `seconds`."""
    async with fresh_schema(servers.db) as schema:
        pool = await asyncpg.create_pool(servers.db, min_size=concurrency, max_size=concurrency)
        try:
            counter = itertools.count()
            commits = 0
            deadline = 0.0

            async def writer() -> None:
                nonlocal commits
                while time.perf_counter() < deadline:
                    n = next(counter)
                    async with pool.acquire() as conn, conn.transaction():
                        await aenqueue(
                            conn,
                            "bench.writer",
                            workload.payload(n, size),
                            key=workload.key(n),
                            schema=schema,
                        )
                    commits += 1

            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(*(writer() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
    return commits / elapsed


async def pipeline(
    servers: Servers, sink: str, size: int, rows: int, batch: int = 500, loops: int = 16
) -> float:
    """Not a bar, an explanation: events/s of the least a relay must do on this machine, with none of
    its guarantees. `loops` concurrent loops each DELETE ... RETURNING `batch` rows (SKIP LOCKED) and
    publish them (aiokafka send + gather, or one XADD pipeline) before the next batch."""
    async with fresh_schema(servers.db) as schema:
        pool = await asyncpg.create_pool(servers.db, min_size=loops, max_size=loops)
        topic = (
            await create_topic(servers.kafka, "bench.pipe")
            if sink == "kafka"
            else f"bench.pipe.{time.monotonic_ns()}"
        )
        producer = AIOKafkaProducer(**producer_options(servers.kafka)) if sink == "kafka" else None
        client = aioredis.from_url(servers.redis) if sink == "redis" else None
        try:
            if producer is not None:
                await producer.start()
                await producer.partitions_for(topic)
            async with pool.acquire() as conn:
                await workload.bulk_insert(conn, schema, topic, rows, size)
            statement = (
                f'/* bench */ DELETE FROM "{schema}".outbox WHERE id IN ('
                f'SELECT id FROM "{schema}".outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) '
                "RETURNING id, message_id, topic, key, payload, headers::text AS headers"
            )

            async def loop() -> None:
                while records := await pool.fetch(statement, batch):
                    if producer is not None:
                        futures = [
                            await producer.send(
                                r["topic"],
                                value=r["payload"],
                                key=r["key"].encode(),
                                headers=[
                                    ("content-type", b"application/json"),
                                    ("message-id", str(r["message_id"]).encode()),
                                ],
                            )
                            for r in records
                        ]
                        await asyncio.gather(*futures)
                    else:
                        assert client is not None
                        pipe = client.pipeline(transaction=False)
                        for r in records:
                            pipe.xadd(
                                r["topic"],
                                {
                                    "message-id": str(r["message_id"]),
                                    "payload": r["payload"],
                                    "headers": r["headers"],
                                    "key": r["key"],
                                },
                            )
                        await pipe.execute()

            started = time.perf_counter()
            await asyncio.gather(*(loop() for _ in range(loops)))
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
            if producer is not None:
                await producer.stop()
                await delete_topic(servers.kafka, topic)
            if client is not None:
                await client.delete(topic)
                await client.aclose()
    return rows / elapsed
