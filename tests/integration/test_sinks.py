"""The sinks against the real brokers: what lands where, in which order, and what each row is told."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from pydantic import SecretStr

from devtools.embedded import StackEndpoints
from relay.config import RelaySettings
from relay.events import OutboxRow, Outcome
from relay.sinks.base import SinkUnavailableError
from relay.sinks.kafka import KafkaSink, batch_ok
from relay.sinks.kafka_batches import SharedBatches
from relay.sinks.redis import RedisSink

PARTITIONS = 4


def make_row(topic: str, key: str | None, payload: bytes, n: int = 0, **headers: str) -> OutboxRow:
    return OutboxRow(
        id=n,
        message_id=uuid.uuid4(),
        topic=topic,
        key=key,
        payload=payload,
        headers=dict(headers),
        created_at=datetime.now(UTC),
        attempts=0,
    )


def sink_settings(stack: StackEndpoints, **overrides: object) -> RelaySettings:
    values: dict[str, object] = {
        "database_url": SecretStr(stack.database_url),
        "kafka_bootstrap": stack.kafka_bootstrap,
        "redis_url": SecretStr(stack.redis_url),
    }
    return RelaySettings(**(values | overrides))  # type: ignore[arg-type]


# -- Kafka ----------------------------------------------------------------------------------------


@pytest.fixture
async def kafka_topic(stack: StackEndpoints) -> AsyncIterator[str]:
    name = f"sink.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
async def kafka_sink(stack: StackEndpoints) -> AsyncIterator[KafkaSink]:
    sink = KafkaSink(sink_settings(stack, kafka_max_request_size=200_000))
    await sink.start()
    for _ in range(300):
        if sink.is_connected():
            break
        await asyncio.sleep(0.05)
    try:
        yield sink
    finally:
        await sink.stop()


async def read_topic(
    bootstrap: str, topic: str, expected: int
) -> dict[int, list[tuple[bytes | None, bytes, dict[str, bytes]]]]:
    """Per partition, the records in offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=20
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[int, list[tuple[bytes | None, bytes, dict[str, bytes]]]] = defaultdict(list)
        seen, idle = 0, 0
        while idle < 5 and seen <= expected:
            batch = await consumer.getmany(timeout_ms=200)
            idle = 0 if any(batch.values()) else idle + 1
            for tp, records in batch.items():
                for record in records:
                    assert record.value is not None
                    out[tp.partition].append((record.key, record.value, dict(record.headers)))
                    seen += 1
        return out
    finally:
        await consumer.stop()


async def test_concurrent_publishes_keep_each_keys_order_on_the_java_clients_partition(
    stack: StackEndpoints, kafka_sink: KafkaSink, kafka_topic: str
) -> None:
    workers, rounds, keys_per_worker = 8, 5, 20
    java_partition = DefaultPartitioner()

    async def worker(w: int) -> None:
        for r in range(rounds):
            rows = [
                make_row(kafka_topic, f"w{w}-k{k}", f"{w}:{k}:{r}".encode(), content_type="json")
                for k in range(keys_per_worker)
            ]
            results = await kafka_sink.publish(rows)
            assert all(result.ok for result in results), results

    await asyncio.gather(*(worker(w) for w in range(workers)))

    total = workers * rounds * keys_per_worker
    by_partition = await read_topic(stack.kafka_bootstrap, kafka_topic, total)
    assert sum(len(records) for records in by_partition.values()) == total
    rounds_seen: dict[bytes, list[int]] = defaultdict(list)
    for partition, records in by_partition.items():
        for key, value, headers in records:
            assert key is not None
            assert partition == java_partition(key, list(range(PARTITIONS)), list(range(PARTITIONS)))
            assert uuid.UUID(headers["message-id"].decode())
            assert headers["content_type"] == b"json"
            rounds_seen[key].append(int(value.decode().rsplit(":", 1)[1]))
    assert len(rounds_seen) == workers * keys_per_worker
    assert all(seen == list(range(rounds)) for seen in rounds_seen.values())


async def test_concurrent_publishes_share_record_batches(
    kafka_sink: KafkaSink, kafka_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = kafka_sink._lanes
    assert lanes is not None
    sent_batches = 0

    def counting(send_batch: Any) -> Any:
        async def counting_send_batch(*args: object, **kwargs: object) -> object:
            nonlocal sent_batches
            sent_batches += 1
            return await send_batch(*args, **kwargs)

        return counting_send_batch

    for producer in lanes.producers:
        monkeypatch.setattr(producer, "send_batch", counting(producer.send_batch))
    calls = 16
    batches = [[make_row(kafka_topic, f"c{c}-{k}", b"x" * 100) for k in range(40)] for c in range(calls)]
    results = await asyncio.gather(*(kafka_sink.publish(rows) for rows in batches))
    assert all(r.ok for rs in results for r in rs)
    # Alone, each call would need a batch per partition: 16 x 4. Shared, far fewer go out.
    assert sent_batches < calls * PARTITIONS / 2, sent_batches


async def test_a_batch_behind_its_partitions_batch_in_flight_rides_the_next_request(
    kafka_sink: KafkaSink, kafka_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the batch in flight is acknowledged, the batch waiting behind it (same partition) goes in
    the same request as another partition's batch that waited for the broker meanwhile, as the
    producer's own queue would send them: not in a request of its own, a round trip later."""
    producer = kafka_sink._producer
    assert producer is not None
    batches = SharedBatches(producer)  # both partitions behind one connection, whatever the lanes
    sender, client = producer._sender, producer.client
    requests: list[set[int]] = []
    first_sent, release_first = asyncio.Event(), asyncio.Event()
    send_produce_req, client_send = sender._send_produce_req, client.send

    async def recording_send_produce_req(node_id: int, node_batches: dict[Any, Any]) -> None:
        requests.append({tp.partition for tp in node_batches})
        await send_produce_req(node_id, node_batches)

    async def holding_send(node_id: int, request: Any, **kwargs: Any) -> Any:
        response = await client_send(node_id, request, **kwargs)
        if request.API_KEY == 0 and not first_sent.is_set():  # the first produce request's answer
            first_sent.set()
            await release_first.wait()
        return response

    monkeypatch.setattr(sender, "_send_produce_req", recording_send_produce_req)
    monkeypatch.setattr(client, "send", holding_send)

    first = batches.append(kafka_topic, 0, b"k0", b"1", [])
    await asyncio.wait_for(first_sent.wait(), 30)
    behind = batches.append(kafka_topic, 0, b"k0", b"2", [])
    beside = batches.append(kafka_topic, 1, b"k1", b"3", [])
    assert behind is not first, "the batch in flight takes no more records"
    await asyncio.wait_for(beside.handed, 30)  # handed to the producer, waiting for the broker
    assert requests == [{0}]
    release_first.set()
    await asyncio.wait({first.delivery, behind.delivery, beside.delivery}, timeout=30)
    assert all(batch_ok(b) for b in (first, behind, beside))
    assert requests == [{0}, {0, 1}]


async def test_a_record_over_the_request_size_is_refused_alone(
    kafka_sink: KafkaSink, kafka_topic: str
) -> None:
    rows = [
        make_row(kafka_topic, "a", b"small"),
        make_row(kafka_topic, "b", b"x" * 300_000),
        make_row(kafka_topic, None, b"keyless"),
    ]
    first, big, keyless = await kafka_sink.publish(rows)
    assert first.ok and keyless.ok
    assert big.outcome is Outcome.REJECT and big.reason == "record_too_large"
    assert "OUTBOX_KAFKA_MAX_REQUEST_SIZE=200000" in big.error


async def test_publishing_before_the_broker_answers_is_unavailable(stack: StackEndpoints) -> None:
    sink = KafkaSink(sink_settings(stack, kafka_bootstrap="127.0.0.1:9"))
    await sink.start()
    try:
        with pytest.raises(SinkUnavailableError):
            await sink.publish([make_row("t", "k", b"v")])
        assert not sink.is_connected()
    finally:
        await sink.stop()


# -- Redis ----------------------------------------------------------------------------------------


@pytest.fixture
async def redis_client(stack: StackEndpoints) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def started_redis_sink(settings: RelaySettings) -> RedisSink:
    sink = RedisSink(settings)
    await sink.start()
    return sink


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_redis_entries_carry_the_same_fields_either_way(
    stack: StackEndpoints, redis_client: aioredis.Redis, scripts: bool
) -> None:
    topic = f"sink.{uuid.uuid4().hex[:10]}"
    sink = await started_redis_sink(
        sink_settings(stack, redis_scripts=scripts, redis_maxlen=1000, redis_shards=f"{topic}.sharded=2")
    )
    try:
        rows = [
            make_row(topic, "k1", b'{"n":1}', traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01", a="b"),
            make_row(topic, None, b"\x00binary\xff"),
            *[make_row(f"{topic}.sharded", f"key-{n}", f"s{n}".encode()) for n in range(10)],
        ]
        results = await sink.publish(rows)
        assert all(r.ok for r in results), results
        entries = await redis_client.xrange(topic)
        assert [fields for _, fields in entries] == [
            {
                b"message-id": str(rows[0].message_id).encode(),
                b"payload": b'{"n":1}',
                b"headers": b'{"traceparent":"00-' + b"1" * 32 + b"-" + b"2" * 16 + b'-01","a":"b"}',
                b"key": b"k1",
                b"traceparent": b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01",
            },
            {
                b"message-id": str(rows[1].message_id).encode(),
                b"payload": b"\x00binary\xff",
                b"headers": b"{}",
            },
        ]
        shards = [await redis_client.xrange(f"{topic}.sharded:{n}") for n in range(2)]
        assert sum(len(s) for s in shards) == 10 and all(shards)
    finally:
        await sink.stop()
        await redis_client.delete(topic, f"{topic}.sharded:0", f"{topic}.sharded:1")


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_a_redis_entry_that_fails_fails_alone(
    stack: StackEndpoints, redis_client: aioredis.Redis, scripts: bool
) -> None:
    topic = f"sink.{uuid.uuid4().hex[:10]}"
    await redis_client.set(f"{topic}.not-a-stream", "a plain string")
    sink = await started_redis_sink(sink_settings(stack, redis_scripts=scripts))
    try:
        rows = [
            make_row(topic, "a", b"1"),
            make_row(f"{topic}.not-a-stream", "b", b"2"),
            make_row(topic, "c", b"3"),
        ]
        before, wrong, after = await sink.publish(rows)
        assert before.ok and after.ok
        assert wrong.outcome is Outcome.RETRY and wrong.reason == "publish_failed"
        assert "WRONGTYPE" in wrong.error
        assert await redis_client.xlen(topic) == 2
    finally:
        await sink.stop()
        await redis_client.delete(topic, f"{topic}.not-a-stream")


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_a_redis_batch_across_streams_keeps_every_byte_and_each_streams_order(
    stack: StackEndpoints, redis_client: aioredis.Redis, scripts: bool
) -> None:
    """The script takes its entries as one length-prefixed argument: payloads that look like that
    framing (digits, colons), empty ones, non-ASCII keys and many streams interleaved must come out
    exactly as they went in, each stream in batch order."""
    topic = f"sink.{uuid.uuid4().hex[:10]}"
    streams = [f"{topic}.{n}" for n in range(7)]
    payloads = [b"", b"12:", b":", b"3:abc", b"\x00:\xff" * 50, "ключ:é".encode(), b"0:" * 1000]
    sink = await started_redis_sink(sink_settings(stack, redis_scripts=scripts))
    try:
        rows = [
            make_row(streams[n % 7], f"ключ-{n % 3}" if n % 2 else None, payloads[n % 7] + b"%d" % n, n=n)
            for n in range(300)
        ]
        results = await sink.publish(rows)
        assert all(r.ok for r in results), results
        for stream in streams:
            mine = [row for row in rows if row.topic == stream]
            entries = await redis_client.xrange(stream)
            assert [fields[b"payload"] for _, fields in entries] == [row.payload for row in mine]
            assert [fields[b"message-id"] for _, fields in entries] == [
                str(row.message_id).encode() for row in mine
            ]
            assert [fields.get(b"key") for _, fields in entries] == [
                row.key.encode() if row.key is not None else None for row in mine
            ]
    finally:
        await sink.stop()
        await redis_client.delete(*streams)


async def test_a_scripted_batch_defers_the_rest_of_a_failed_stream_only(
    stack: StackEndpoints, redis_client: aioredis.Redis
) -> None:
    topic = f"sink.{uuid.uuid4().hex[:10]}"
    broken = f"{topic}.not-a-stream"
    await redis_client.set(broken, "a plain string")
    sink = await started_redis_sink(sink_settings(stack, redis_scripts=True))
    try:
        rows = [make_row(broken if n % 2 else topic, f"k{n}", b"%d" % n, n=n) for n in range(6)]
        results = await sink.publish(rows)
        assert [r.outcome for r in results] == [
            Outcome.PUBLISHED,
            Outcome.RETRY,
            Outcome.PUBLISHED,
            Outcome.DEFERRED,
            Outcome.PUBLISHED,
            Outcome.DEFERRED,
        ]
        assert [fields[b"payload"] for _, fields in await redis_client.xrange(topic)] == [b"0", b"2", b"4"]
    finally:
        await sink.stop()
        await redis_client.delete(topic, broken)


async def test_a_redis_that_refuses_scripts_is_unavailable_not_a_failure_of_the_events(
    stack: StackEndpoints, redis_client: aioredis.Redis
) -> None:
    """An ACL without scripting must not count attempts (that would dead-letter good events)."""
    user, password = f"noscript-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    await redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "-@scripting"
    )
    host_port = stack.redis_url.split("://", 1)[1].rsplit("@", 1)[-1]
    topic = f"sink.{uuid.uuid4().hex[:10]}"
    sink = await started_redis_sink(
        sink_settings(stack, redis_url=SecretStr(f"redis://{user}:{password}@{host_port}"))
    )
    try:
        with pytest.raises(SinkUnavailableError, match=r"NOPERM|permission"):
            await sink.publish([make_row(topic, "k", b"v")])
        assert not sink.is_connected()
        assert await redis_client.xlen(topic) == 0
    finally:
        await sink.stop()
        await redis_client.execute_command("ACL", "DELUSER", user)
