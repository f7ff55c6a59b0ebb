"""A few producers per relay, each Kafka topic-partition bound to one of them (OUTBOX_KAFKA_CONNECTIONS).

aiokafka keeps one produce request in flight per broker connection. With every partition behind
one connection, a batch handed over while a request is in flight waits for that request's answer
even when the request carries other partitions only; on a single broker that is every batch. Each
producer here has connections of its own, so up to that many requests to one broker overlap.

A partition always goes through the same producer, and its batches through that producer's chain
(kafka_batches.SharedBatches): its order is kept exactly as with one producer. Only batches of
different partitions, which Kafka never orders against each other, travel side by side."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer

from relay.sinks.kafka_batches import SharedBatches


class ProducerLanes:
    """The relay's producers and the shared batches of each."""

    def __init__(self, producers: Sequence[AIOKafkaProducer], linger_ms: int = 0) -> None:
        if not producers:
            raise ValueError("at least one producer")
        self.producers = list(producers)
        self._batches = [SharedBatches(producer, linger_ms) for producer in self.producers]

    @classmethod
    async def start(
        cls, count: int, make: Callable[[], AIOKafkaProducer], linger_ms: int = 0
    ) -> ProducerLanes:
        """`count` producers made by `make`, started. If one fails to start, those already started
        are stopped and its error propagates."""
        started: list[AIOKafkaProducer] = []
        try:
            for _ in range(count):
                producer = make()
                started.append(producer)
                await producer.start()
        except BaseException:
            for producer in started:
                with contextlib.suppress(Exception):
                    await asyncio.shield(producer.stop())  # also when cancelled while connecting
            raise
        return cls(started, linger_ms)

    async def stop(self) -> None:
        """Stops every producer at once (each flushes what it holds, within its request timeout);
        the first error, if any, once all have stopped."""
        outcomes = await asyncio.gather(*(p.stop() for p in self.producers), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    @property
    def primary(self) -> AIOKafkaProducer:
        """The producer whose metadata decides partitions, probes the broker and sends dead letters."""
        return self.producers[0]

    def batches_for(self, partition: int) -> SharedBatches:
        return self._batches[partition % len(self._batches)]

    def producer_for(self, partition: int) -> AIOKafkaProducer:
        return self.producers[partition % len(self.producers)]

    async def know_partitions(self, topic: str, partitions: Sequence[int]) -> bool:
        """Whether every producer's metadata knows all of the topic's `partitions` (as the primary
        found them), refreshing a producer's that lags behind once. A producer must know a partition
        before it takes a batch for it; partitions are added to topics, never removed."""
        for producer in self.producers[1:]:
            if _known(producer, topic) >= len(partitions):  # every publish: a lookup, no await
                continue
            if len(await producer.partitions_for(topic)) < len(partitions):  # the topic's first use
                await producer.client.force_metadata_update()
                if _known(producer, topic) < len(partitions):
                    return False
        return True


def _known(producer: AIOKafkaProducer, topic: str) -> int:
    return len(producer.client.cluster.partitions_for_topic(topic) or ())
