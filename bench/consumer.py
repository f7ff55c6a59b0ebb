"""The latency consumer, in its own process so the writers' event loop cannot delay it.

Protocol over a multiprocessing pipe: the child sends "ready" once it is assigned to every partition
of the (fresh, empty) topic; the parent later sends ("expect", count, timeout); the child answers with
its samples [(n, arrival wall time, latency s, pickup s)], the number of duplicates and the number of
per-key order violations, then exits.
pickup: from the payload's time to the record's CreateTime, which aiokafka stamps when a record is
appended to a batch (ms resolution): the relay's share (wake-up, claim, hand-over to the producer).
A payload without a time (a bulk-inserted backlog) gives NaN latency and pickup: only its arrival counts.
Order: events of one key are made in increasing n, so a record whose n is below the last n that arrived
for its key (the Kafka record key) is an order violation; duplicates are not counted as violations."""

from __future__ import annotations

import asyncio
import json
import math
import time
from multiprocessing.connection import Connection
from typing import Any


def run(bootstrap: str, topic: str, pipe: Connection) -> None:
    asyncio.run(_consume(bootstrap, topic, pipe))


async def _consume(bootstrap: str, topic: str, pipe: Connection) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    # fetch_max_wait_ms=5: the Tansu broker holds every fetch for the whole fetch_max_wait_ms.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
    )
    await consumer.start()
    samples: list[tuple[int, float, float, float]] = []
    seen: set[int] = set()
    duplicates = 0
    order = KeyOrder()
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            await consumer.position(tp)
        pipe.send("ready")
        expected: int | None = None
        deadline = float("inf")
        while expected is None or (len(seen) < expected and time.monotonic() < deadline):
            batch = await consumer.getmany(timeout_ms=20, max_records=5000)
            arrived = time.time()
            for records in batch.values():
                for record in records:
                    body: dict[str, Any] = json.loads(record.value or b"{}")
                    n = int(body["n"])
                    if n in seen:
                        duplicates += 1
                        continue
                    seen.add(n)
                    order.saw(record.key, n)
                    made = float(body["t"]) if "t" in body else math.nan
                    samples.append((n, arrived, arrived - made, record.timestamp / 1000 - made))
            if expected is None and pipe.poll():
                _, expected, timeout = pipe.recv()
                deadline = time.monotonic() + timeout
    finally:
        await consumer.stop()
    pipe.send((samples, duplicates, order.violations))


class KeyOrder:
    """Counts per-key order violations: an event arriving after a later event of the same key."""

    def __init__(self) -> None:
        self.last: dict[bytes | None, int] = {}
        self.violations = 0

    def saw(self, key: bytes | None, n: int) -> None:
        last = self.last.get(key)
        if last is not None and n < last:
            self.violations += 1
            return
        self.last[key] = n
