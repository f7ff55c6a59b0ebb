"""Record batches shared by every partition worker of a relay.

aiokafka's `send()` costs one coroutine, one future and one partitioner run per message, which
profiling showed to be ~40% of a relay draining a backlog. Here the relay builds the record batches
itself: each row is appended to the one open batch of its topic-partition, and every worker
publishing at the same moment appends to the same batch, so a produce request still carries
everything that is waiting, as the producer's own accumulator would.

Per topic-partition the batches form a chain: a batch is handed to the producer only once the one
before it was acknowledged, and stays open for more rows until then. The batch before it hands it
over, in the same turn of the event loop as the acknowledgement arrives, so it rides the very next
produce request with whatever else waited for that broker (see `OpenBatch`). If a batch fails, the batch
queued behind it is not sent at all but fails with `PredecessorFailed`: an event that was
acknowledged while an earlier event of its key failed would be out of order for good. Nothing is
lost by that: the rows stay in the outbox and go again, behind the earlier ones. (aiokafka would
otherwise queue every batch of a partition and time out the later ones independently of the earlier
ones, which is how slow acknowledgements of large events broke per-key order.)

Batching happens only under load (`HandOver`): a batch with nothing in flight before it goes at
once, so a lone event waits for no timer; a batch grows while a send is outstanding, its
predecessor in the chain or, in the producer, the request in flight to its broker (aiokafka sends
one request per broker connection at a time and drains every batch waiting for that broker into the
next). The relay runs a few producers, each partition bound to one (kafka_lanes.ProducerLanes), and
one SharedBatches per producer."""

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


class PredecessorFailed(Exception):
    """The batch before this one in its topic-partition failed, so this one was not sent."""


class HandOver:
    """Whether a batch is closed as it is handed to the producer (then the producer sends it as soon
    as its broker connection is free) or left open to linger there for more rows.

    With no linger (the default) nothing is ever closed early: the producer lingers for nothing, and
    an open batch keeps taking rows while the request before it to the same broker is in flight.
    With a linger, only a lone batch handed over while the producer already has batches in flight
    lingers (the load the linger is for); a batch with nothing in flight before it, or one that
    gathered rows while its predecessor in the chain was in flight, goes at once."""

    __slots__ = ("linger_ms",)

    def __init__(self, linger_ms: int) -> None:
        self.linger_ms = linger_ms

    def close_at_handover(self, *, chained: bool, producer_busy: bool) -> bool:
        if self.linger_ms <= 0:
            return False
        return chained or not producer_busy


class OpenBatch:
    """One record batch and the task that waits for its acknowledgement.

    A batch with a batch before it in its topic-partition's chain does not hand itself over: the
    one before it does, from the turn of the event loop in which its own acknowledgement arrives
    (`_release_next`), so that the producer's sender, which runs next, drains it together with what
    waits for the same broker. Handed over any later (after a task of its own woke up), it would miss
    that request and wait for the next one: a whole round trip more, under load, for the events of
    a busy partition."""

    __slots__ = ("behind", "builder", "chained", "delivery", "handed", "next", "outcome", "partition", "topic")

    def __init__(self, builder: BatchBuilder, topic: str, partition: int, behind: bool) -> None:
        self.builder = builder
        self.topic = topic
        self.partition = partition
        self.behind = behind  # started behind another batch of its chain (it gathered rows meanwhile)
        self.chained = False  # handed over (or failed) by the batch before it, not by itself
        self.next: OpenBatch | None = None  # the batch behind this one in the chain, if any yet
        # The producer's acknowledgement future once handed over (or why it could not be).
        self.handed: asyncio.Future[asyncio.Future[Any]] = asyncio.get_running_loop().create_future()
        self.outcome: bool | None = None  # acknowledged (True) or failed (False), once known
        self.delivery: asyncio.Task[Any]

    @property
    def records(self) -> int:
        return int(self.builder.record_count())


class SharedBatches:
    """The open batch of each topic-partition, for one producer."""

    def __init__(self, producer: AIOKafkaProducer, linger_ms: int = 0) -> None:
        self._producer = producer
        self._handover = HandOver(linger_ms)
        self._in_flight = 0  # batches handed to the producer and not yet acknowledged
        self._open: dict[tuple[str, int], OpenBatch] = {}
        self._newest: dict[tuple[str, int], OpenBatch] = {}  # the chain's last batch

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
        batch = self._start(topic, partition, key, value, headers, after=self._newest.get(tp))
        self._open[tp] = batch
        self._newest[tp] = batch
        batch.delivery.add_done_callback(lambda _: self._forget(tp, batch))
        return batch

    def alone(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: Headers
    ) -> OpenBatch:
        """A batch of its own for one record, outside the chain: used to find which record of a
        refused batch the broker objects to (the caller sends these one at a time)."""
        return self._start(topic, partition, key, value, headers, after=None)

    def _start(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        after: OpenBatch | None,
    ) -> OpenBatch:
        builder = self._producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            raise RuntimeError("an empty Kafka record batch refused its first record")
        batch = OpenBatch(builder, topic, partition, behind=after is not None)
        if after is not None and after.outcome is None:
            after.next, batch.chained = batch, True  # it hands this one over once it knows its fate
        elif after is not None and not after.outcome:
            batch.handed.set_exception(_predecessor_failed(batch))
        batch.delivery = asyncio.create_task(self._deliver(batch), name=f"kafka-batch-{topic}-{partition}")
        batch.delivery.add_done_callback(_retrieve_exception)
        return batch

    async def _deliver(self, batch: OpenBatch) -> Any:
        try:
            if not batch.chained and not batch.handed.done():
                await self._hand_over(batch)
            acknowledged = await batch.handed
            try:
                result = await acknowledged
            finally:
                self._in_flight -= 1
        except BaseException:
            self._fail_next(batch)
            raise
        await self._release_next(batch)
        return result

    async def _hand_over(self, batch: OpenBatch) -> None:
        """Gives the batch to the producer. How that went is `batch.handed`'s to say: an error is the
        batch's own, not its caller's (the batch before it may be the one handing it over)."""
        if self._handover.close_at_handover(chained=batch.behind, producer_busy=self._in_flight > 0):
            batch.builder.close()
        try:
            acknowledged = await self._producer.send_batch(batch.builder, batch.topic, partition=batch.partition)
        except asyncio.CancelledError:
            batch.handed.cancel()
            raise
        except BaseException as exc:
            if not batch.handed.done():
                batch.handed.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # the process is being stopped: not for a batch to hold up
            return
        if batch.handed.done():  # its task was cancelled meanwhile: nobody waits for the answer
            acknowledged.add_done_callback(_retrieve_exception)
            return
        self._in_flight += 1
        batch.handed.set_result(acknowledged)

    async def _release_next(self, batch: OpenBatch) -> None:
        """The batch was acknowledged: the next batch of its chain is handed over at once (before
        this task yields, unless the producer makes it wait)."""
        batch.outcome = True
        following, batch.next = batch.next, None
        if following is not None and not following.handed.done():  # not cancelled meanwhile
            await self._hand_over(following)

    def _fail_next(self, batch: OpenBatch) -> None:
        """The batch failed (or was never sent): the next batch of its chain fails unsent."""
        batch.outcome = False
        following, batch.next = batch.next, None
        if following is not None and not following.handed.done():
            following.handed.set_exception(_predecessor_failed(following))

    def _forget(self, tp: tuple[str, int], batch: OpenBatch) -> None:
        if self._open.get(tp) is batch:
            del self._open[tp]
        if self._newest.get(tp) is batch:
            del self._newest[tp]


def _predecessor_failed(batch: OpenBatch) -> PredecessorFailed:
    return PredecessorFailed(f"an earlier record batch of {batch.topic}[{batch.partition}] failed")


def _retrieve_exception(task: asyncio.Future[Any]) -> None:
    # Each caller reads the outcome it needs; this keeps asyncio from reporting it as never retrieved.
    if not task.cancelled():
        task.exception()
