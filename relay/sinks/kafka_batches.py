"""Record batches shared by every partition worker of a relay.

aiokafka's `send()` costs one coroutine, one future and one partitioner run per message, which
profiling showed to be ~40% of a relay draining a backlog. Here the relay builds the record batches
itself: each row is appended to the one open batch of its topic-partition, and every worker
publishing at the same moment appends to the same batch, so a produce request still carries
everything that is waiting, as the producer's own accumulator would. A batch stays open until the
producer takes it for a request (or it is full); the next row starts a new one, queued behind it.

Per topic-partition the producer sends batches in the order they were opened, and a worker waits for
its batch's acknowledgement before publishing again, so per-key order is kept."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

Headers = Sequence[tuple[str, bytes]]
_HASH_CACHE_LIMIT = 200_000


class KeyPartitioner:
    """Kafka's default partitioning (the Java client's murmur2 of the key), so a key lands on the
    partition any other Kafka producer would choose. Hashes are cached: keys repeat (aggregate ids),
    and the pure-Python murmur2 costs about a microsecond."""

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}

    def partition(self, key: bytes | None, partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is None:
            return random.choice(available or partitions)
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= _HASH_CACHE_LIMIT:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]


class OpenBatch:
    """One record batch and the task that hands it to the producer and waits for its acknowledgement."""

    __slots__ = ("builder", "delivery", "partition")

    def __init__(self, builder: BatchBuilder, partition: int, delivery: asyncio.Task[Any]) -> None:
        self.builder = builder
        self.partition = partition
        self.delivery = delivery

    @property
    def records(self) -> int:
        return int(self.builder.record_count())


class SharedBatches:
    """The open batch of each topic-partition, for one producer."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], OpenBatch] = {}

    def append(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: Headers
    ) -> OpenBatch:
        """Adds one record; returns the batch that carries it."""
        tp = (topic, partition)
        batch = self._open.get(tp)
        if batch is not None and (
            batch.builder.append(timestamp=None, key=key, value=value, headers=headers) is not None
        ):
            return batch
        batch = self.alone(topic, partition, key, value, headers)
        self._open[tp] = batch
        batch.delivery.add_done_callback(lambda _: self._forget(tp, batch))
        return batch

    def alone(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: Headers
    ) -> OpenBatch:
        """A batch of its own for one record (not shared): used to find which record a broker refused."""
        builder = self._producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            raise RuntimeError("an empty Kafka record batch refused its first record")
        delivery = asyncio.create_task(
            self._deliver(builder, topic, partition), name=f"kafka-batch-{topic}-{partition}"
        )
        delivery.add_done_callback(_retrieve_exception)
        return OpenBatch(builder, partition, delivery)

    async def _deliver(self, builder: BatchBuilder, topic: str, partition: int) -> Any:
        acknowledged = await self._producer.send_batch(builder, topic, partition=partition)
        return await acknowledged

    def _forget(self, tp: tuple[str, int], batch: OpenBatch) -> None:
        if self._open.get(tp) is batch:
            del self._open[tp]


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    # Each caller reads the outcome it needs; this keeps asyncio from reporting it as never retrieved.
    if not task.cancelled():
        task.exception()
