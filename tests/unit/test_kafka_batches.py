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
from relay.sinks.kafka import KafkaSink, batch_ok
from relay.sinks.kafka_batches import HandOver, KeyPartitioner, OpenBatch, PredecessorFailed, SharedBatches
from relay.sinks.kafka_lanes import ProducerLanes

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

    def close(self) -> None:
        self.closed = True


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
    sink._lanes = ProducerLanes([producer])  # type: ignore[list-item]
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


# -- batching only under load: a lone batch goes at once, batches grow while a send is outstanding --


class Handed:
    """One batch handed to the producer, and the acknowledgement the test gives or refuses."""

    def __init__(self, builder: FakeBuilder, partition: int) -> None:
        self.builder = builder
        self.partition = partition
        self.closed_at_handover = builder.closed
        self.ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def values(self) -> list[bytes]:
        return [value for _, value in self.builder.records]


class ManualProducer:
    """Sends each batch at once (closed, as aiokafka closes a batch it takes for a request), and
    each waits for its acknowledgement until the test gives or refuses it."""

    def __init__(self) -> None:
        self.handed: list[Handed] = []

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder()

    async def send_batch(self, builder: FakeBuilder, topic: str, *, partition: int) -> asyncio.Future[None]:
        handed = Handed(builder, partition)
        self.handed.append(handed)
        builder.close()
        return handed.ack


async def run_ready_tasks() -> None:
    """Lets every task that can run without waiting for anything run (no wall-clock time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_hand_over_policy() -> None:
    no_linger = HandOver(0)
    assert not any(
        no_linger.close_at_handover(chained=chained, producer_busy=busy)
        for chained in (False, True)
        for busy in (False, True)
    )  # the producer lingers for nothing: an open batch only grows while its broker is busy
    linger = HandOver(5)
    assert linger.close_at_handover(chained=False, producer_busy=False)  # idle: at once
    assert linger.close_at_handover(chained=True, producer_busy=True)  # it gathered rows already
    assert linger.close_at_handover(chained=True, producer_busy=False)
    assert not linger.close_at_handover(chained=False, producer_busy=True)  # under load: it lingers


async def test_a_lone_record_is_handed_over_at_once() -> None:
    for linger_ms in (0, 5, 60_000):
        producer = ManualProducer()
        batches = SharedBatches(producer, linger_ms)  # type: ignore[arg-type]
        batch = batches.append("t", 0, b"k", b"lone", [])
        await run_ready_tasks()
        assert [h.values for h in producer.handed] == [[b"lone"]]
        # With a linger, closing is what makes the producer send it without waiting for it.
        assert producer.handed[0].closed_at_handover == (linger_ms > 0)
        producer.handed[0].ack.set_result(None)
        await asyncio.wait({batch.delivery}, timeout=5)
        assert batch.delivery.done() and batch.delivery.exception() is None


async def test_a_batch_grows_while_its_predecessor_is_in_flight_and_goes_when_it_is_acknowledged() -> None:
    producer = ManualProducer()
    batches = SharedBatches(producer)  # type: ignore[arg-type]
    first = batches.append("t", 0, b"k", b"1", [])
    await run_ready_tasks()
    assert len(producer.handed) == 1
    # Two workers publish meanwhile: their rows wait in one batch behind the one in flight.
    second = batches.append("t", 0, b"k", b"2", [])
    third = batches.append("t", 0, b"j", b"3", [])
    assert second is third and second is not first
    await run_ready_tasks()
    assert len(producer.handed) == 1  # never two batches of one partition in flight
    producer.handed[0].ack.set_result(None)
    await run_ready_tasks()
    assert [h.values for h in producer.handed] == [[b"1"], [b"2", b"3"]]
    # Another partition is not held up by this one's chain.
    other = batches.append("t", 1, b"x", b"other", [])
    await run_ready_tasks()
    assert producer.handed[-1].values == [b"other"] and producer.handed[-1].partition == 1
    producer.handed[1].ack.set_result(None)
    producer.handed[2].ack.set_result(None)
    await asyncio.wait({first.delivery, second.delivery, other.delivery}, timeout=5)
    assert all(b.delivery.exception() is None for b in (first, second, other))


async def test_with_a_linger_only_a_batch_handed_over_under_load_lingers() -> None:
    producer = ManualProducer()
    batches = SharedBatches(producer, 5)  # type: ignore[arg-type]
    batches.append("t", 0, b"k", b"a", [])
    await run_ready_tasks()
    batches.append("t", 1, b"x", b"b", [])  # partition 0 is in flight: the producer is busy
    batches.append("t", 0, b"k", b"c", [])  # chained behind partition 0's batch
    await run_ready_tasks()
    assert [(h.values, h.closed_at_handover) for h in producer.handed] == [([b"a"], True), ([b"b"], False)]
    producer.handed[0].ack.set_result(None)
    await run_ready_tasks()
    assert (producer.handed[2].values, producer.handed[2].closed_at_handover) == ([b"c"], True)


async def test_a_failed_batch_keeps_the_next_one_of_its_partition_from_being_sent() -> None:
    producer = ManualProducer()
    batches = SharedBatches(producer)  # type: ignore[arg-type]
    first = batches.append("t", 0, b"k", b"1", [])
    await run_ready_tasks()
    second = batches.append("t", 0, b"k", b"2", [])
    producer.handed[0].ack.set_exception(MessageSizeTooLargeError())
    await asyncio.wait({first.delivery, second.delivery}, timeout=5)
    assert isinstance(second.delivery.exception(), PredecessorFailed)
    assert len(producer.handed) == 1


async def one_in_flight_one_behind() -> tuple[ManualProducer, SharedBatches, OpenBatch, OpenBatch]:
    """A batch handed to the producer and not acknowledged yet, and one waiting behind it."""
    producer = ManualProducer()
    batches = SharedBatches(producer)  # type: ignore[arg-type]
    first = batches.append("t", 0, b"k", b"1", [])
    await run_ready_tasks()
    second = batches.append("t", 0, b"k", b"2", [])
    await run_ready_tasks()
    return producer, batches, first, second


async def test_a_batch_whose_task_was_cancelled_while_it_waited_is_not_handed_over() -> None:
    producer, batches, first, second = await one_in_flight_one_behind()
    second.delivery.cancel()
    await run_ready_tasks()
    producer.handed[0].ack.set_result(None)
    await asyncio.wait({first.delivery}, timeout=5)
    assert batch_ok(first) and second.delivery.cancelled()
    assert len(producer.handed) == 1, "nobody waits for it: it is not sent"
    third = batches.append("t", 0, b"k", b"3", [])  # the chain goes on without it
    await run_ready_tasks()
    assert [h.values for h in producer.handed] == [[b"1"], [b"3"]]
    producer.handed[1].ack.set_result(None)
    await asyncio.wait({third.delivery}, timeout=5)
    assert batch_ok(third)


async def test_a_batch_started_behind_a_failed_one_fails_unsent() -> None:
    producer = ManualProducer()
    batches = SharedBatches(producer)  # type: ignore[arg-type]
    first = batches.append("t", 0, b"k", b"1", [])
    await run_ready_tasks()
    producer.handed[0].ack.set_exception(MessageSizeTooLargeError())
    await asyncio.sleep(0)  # the failure is known, the first batch's task not finished yet
    late = batches.append("t", 0, b"k", b"2", [])
    await asyncio.wait({first.delivery, late.delivery}, timeout=5)
    assert isinstance(late.delivery.exception(), PredecessorFailed)
    assert len(producer.handed) == 1


class _ProcessEnding(BaseException):
    """Not an Exception: the kind a stopping process or a test framework raises."""


async def test_a_hand_over_that_raises_any_error_ends_the_batch_it_was_for() -> None:
    producer, _batches, first, second = await one_in_flight_one_behind()

    async def refusing(*_args: object, **_kwargs: object) -> None:
        raise _ProcessEnding

    producer.send_batch = refusing  # type: ignore[assignment,method-assign]
    producer.handed[0].ack.set_result(None)  # the first one hands the second over, which fails
    await asyncio.wait({first.delivery, second.delivery}, timeout=5)
    assert second.delivery.done(), "nothing may wait for a hand-over that failed"
    assert isinstance(second.delivery.exception(), _ProcessEnding)
