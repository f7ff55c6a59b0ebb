"""Per-key order when the broker is slow to acknowledge large events, and when it refuses part of a
batch. Real relay process, real broker and Redis; checked from what consumers read."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis

from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    check_delivery,
    create_kafka_topic,
    pending_count,
    read_kafka,
    read_redis,
    relay_logs,
    unique_name,
    wait_until,
)
from tests.acceptance.test_relay_failures import dead_letters, insert_events

pytestmark = pytest.mark.slow


async def test_slow_acknowledgements_of_large_events_keep_per_key_order(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    """Many 1 MiB record batches queue per broker partition and the request timeout is short, so
    some batches time out while later ones of the same partition go through. Before record batches
    were chained per partition, that published a key's later events ahead of its earlier ones."""
    topic = topics["kafka"]
    await create_kafka_topic(stack.kafka_bootstrap, topic, partitions=2)
    rng = random.Random(7)
    events = [(topic, f"k{rng.randrange(40)}", rng.randbytes(96 * 1024)) for _ in range(1500)]
    written = await insert_events(fleet.database_url, fleet.schema, events)
    relay = fleet.spawn(
        "relay-slow-acks",
        OUTBOX_PUBLISH_TIMEOUT="1",
        OUTBOX_KAFKA_MAX_REQUEST_SIZE=str(4 * 1024 * 1024),
        OUTBOX_BATCH_SIZE="500",
    )

    async def drained() -> bool:
        assert relay.alive(), relay_logs(fleet)
        return await pending_count(fleet.database_url, fleet.schema) == 0

    await wait_until(drained, 240, interval=1.0, what="the backlog of large events to drain")
    assert await dead_letters(fleet) == [], "slow acknowledgements are not the events' fault"
    check_delivery(written, await read_kafka(stack.kafka_bootstrap, topic))


async def test_a_stream_that_refuses_an_entry_gets_none_of_its_later_entries_first(
    stack: StackEndpoints, fleet: Fleet
) -> None:
    """Redis refuses every XADD to a stream whose key holds a string (WRONGTYPE): part of a batch
    fails while the rest succeeds. Once the key is fixed, the refused stream's events arrive in id
    order and the other streams were never held up."""
    bad, good = unique_name("rt.bad."), unique_name("rt.good.")
    client = aioredis.from_url(stack.redis_url)
    await client.set(bad, "not a stream")
    events = [(t, f"k{n % 5}", f"{t}-{n}".encode()) for n in range(200) for t in (bad, good)]
    written = await insert_events(fleet.database_url, fleet.schema, events)
    fleet.spawn("relay-partial", OUTBOX_MAX_ATTEMPTS="50", OUTBOX_BACKOFF_MAX="0.5")
    try:

        async def good_delivered() -> bool:
            return len(await read_redis(stack.redis_url, good)) >= 200

        await wait_until(good_delivered, 60, what="the healthy stream's events")
        assert await client.type(bad) == b"string", "the refused stream got nothing meanwhile"
        await client.delete(bad)

        async def drained() -> bool:
            return await pending_count(fleet.database_url, fleet.schema) == 0

        await wait_until(drained, 60, what="the refused stream's events once it is fixed")
    finally:
        await client.aclose()
    assert await dead_letters(fleet) == []
    received = await read_redis(stack.redis_url, bad) + await read_redis(stack.redis_url, good)
    check_delivery(written, received)
