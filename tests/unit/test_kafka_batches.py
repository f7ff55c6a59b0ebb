"""The Kafka sink's own batching logic, against a fake producer (the real broker is in
tests/integration/test_sinks.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from pydantic import SecretStr

from relay.config import RelaySettings
from relay.events import OutboxRow, Outcome
from relay.sinks.kafka import KafkaSink
from relay.sinks.kafka_batches import KeyPartitioner, SharedBatches

BROKER_LIMIT = 1000  # bytes per record this fake broker accepts; the relay's own limit is higher


class FakeBuilder:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self.closed = False

    def append(
        self, *, timestamp: float | None, key: bytes | None, value: bytes, headers: Any
    ) -> object | None:
        if self.closed:
            return None
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class FakeProducer:
    """Refuses a whole batch when any record in it is over BROKER_LIMIT, as Kafka does."""

    def __init__(self) -> None:
        self.delivered: list[tuple[int, bytes | None, bytes]] = []
        self.batches_sent = 0
        available = {0, 1, 2}
        self.client = SimpleNamespace(
            cluster=SimpleNamespace(available_partitions_for_topic=lambda _: available)
        )

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder()

    async def send_batch(self, builder: FakeBuilder, topic: str, *, partition: int) -> asyncio.Future[None]:
        await asyncio.sleep(0)  # other publishes append to the open batch meanwhile
        builder.closed = True
        self.batches_sent += 1
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if any(len(value) > BROKER_LIMIT for _, value in builder.records):
            acknowledged.set_exception(MessageSizeTooLargeError())
        else:
            self.delivered.extend((partition, key, value) for key, value in builder.records)
            acknowledged.set_result(None)
        return acknowledged


def sink_on(producer: FakeProducer) -> KafkaSink:
    sink = KafkaSink(RelaySettings(database_url=SecretStr("postgresql://x@y/z"), kafka_bootstrap="fake:9092"))
    sink._producer = producer  # type: ignore[assignment]
    sink._batches = SharedBatches(producer)  # type: ignore[arg-type]
    return sink


def row(key: str | None, payload: bytes) -> OutboxRow:
    return OutboxRow(1, uuid.uuid4(), "t", key, payload, {}, datetime.now(UTC), 0)


async def test_a_batch_refused_for_one_record_is_retried_record_by_record() -> None:
    producer = FakeProducer()
    sink = sink_on(producer)
    rows = [row("same", b"before"), row("same", b"x" * 5000), row("same", b"after"), row("other", b"o")]
    results = await sink.publish(rows)
    assert [r.outcome for r in results] == [
        Outcome.PUBLISHED,
        Outcome.REJECT,
        Outcome.PUBLISHED,
        Outcome.PUBLISHED,
    ]
    assert results[1].reason == "record_too_large"
    assert sorted(value for _, _, value in producer.delivered) == [b"after", b"before", b"o"]
    same = [value for _, key, value in producer.delivered if key == b"same"]
    assert same == [b"before", b"after"]


async def test_publishes_in_flight_together_share_one_batch_per_partition() -> None:
    producer = FakeProducer()
    sink = sink_on(producer)
    calls = [[row(f"k{n}", b"v") for n in range(30)] for _ in range(10)]
    results = await asyncio.gather(*(sink.publish(rows) for rows in calls))
    assert all(r.ok for rs in results for r in rs)
    assert len(producer.delivered) == 300
    assert producer.batches_sent == 3  # one per partition, not one per call and partition


def test_key_partitioning_matches_the_java_client() -> None:
    ours, theirs = KeyPartitioner(), DefaultPartitioner()
    for partitions in ([0], [0, 1, 2], list(range(8)), list(range(13))):
        for n in range(500):
            key = f"order-{n}".encode()
            assert ours.partition(key, partitions, partitions) == theirs(key, partitions, partitions)


def test_keyless_records_go_to_a_partition_with_a_leader() -> None:
    partitioner = KeyPartitioner()
    chosen = {partitioner.partition(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert chosen == {1, 3}
