"""Several real relay processes against real Postgres, Kafka (Tansu) and Redis."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    check_delivery,
    create_kafka_topic,
    leases_by_holder,
    published_count,
    read_kafka,
    read_redis,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.slow
TTL = 3.0


async def drained(fleet: Fleet, timeout: float = 90) -> None:
    await fleet.wait_drained(timeout)


async def read_all(stack: StackEndpoints, topics: dict[str, str]):  # type: ignore[no-untyped-def]
    return await read_kafka(stack.kafka_bootstrap, topics["kafka"]) + await read_redis(
        stack.redis_url, topics["redis"]
    )



async def flowing(fleet: Fleet, published: int) -> bool:
    """At least `published` events have been settled: traffic is flowing."""
    return await published_count(fleet.database_url, fleet.schema) >= published

async def test_three_relays_deliver_everything_in_key_order(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    for n in range(3):
        fleet.spawn(f"relay-{n}")
    written = await write_events(
        fleet.database_url, fleet.schema, list(topics.values()), total=20_000, keys=1000
    )
    await drained(fleet)
    result = check_delivery(written, await read_all(stack, topics))
    assert result["delivered"] == 20_000
    assert result["duplicates"] == 0, "no crash happened, so nothing may arrive twice"

    # The drain may finish before the late starters got their share (a few heartbeats): the split
    # must converge to an even one all the same.
    async def evenly_split() -> bool:
        held = await leases_by_holder(fleet.database_url, fleet.schema)
        counts = [sum(n.startswith("partition:") for n in names) for names in held.values()]
        return sorted(counts) == [5, 5, 6]

    await wait_until(evenly_split, timeout=15, what="a 6/5/5 split of the 16 partitions")


async def test_kill_9_mid_run_loses_nothing_and_is_taken_over_within_the_ttl(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    relays = [fleet.spawn(f"relay-{n}") for n in range(3)]
    victim = relays[0]

    async def balanced() -> bool:
        held = await leases_by_holder(fleet.database_url, fleet.schema)
        return len(held.get(victim.instance_id, [])) >= 4

    await wait_until(balanced, 30, what="the victim to hold partitions")
    writing = asyncio.create_task(
        write_events(
            fleet.database_url, fleet.schema, list(topics.values()), total=20_000, keys=1000, pace=0.002
        )
    )
    await wait_until(lambda: flowing(fleet, 1000), 30, interval=0.1, what="events to flow before the kill")
    victim_leases = [
        n for n in (await leases_by_holder(fleet.database_url, fleet.schema))[victim.instance_id]
    ]
    victim_partitions = [n for n in victim_leases if n.startswith("partition:")]
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    async def taken_over() -> bool:
        held = await leases_by_holder(fleet.database_url, fleet.schema)
        survivors = {name for holder, names in held.items() if holder != victim.instance_id for name in names}
        return set(victim_partitions) <= survivors

    await wait_until(taken_over, 4 * TTL, interval=0.1, what="takeover of the victim's partitions")
    takeover = time.monotonic() - killed_at
    written = await writing
    await drained(fleet)
    result = check_delivery(written, await read_all(stack, topics))
    # Only the victim's unsettled in-flight batches may arrive twice: one batch per partition it held.
    assert result["duplicates"] <= len(victim_partitions) * 200, result
    # A lease lives TTL after its last renewal; survivors look every TTL/3.
    assert takeover <= TTL + TTL / 3 + 1.0, f"takeover took {takeover:.1f}s"


async def test_sigterm_releases_leases_for_immediate_takeover(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    leaving, staying = fleet.spawn("relay-leaving"), fleet.spawn("relay-staying")

    async def balanced() -> bool:
        held = await leases_by_holder(fleet.database_url, fleet.schema)
        return len([n for n in held.get(leaving.instance_id, []) if n.startswith("partition:")]) == 8

    await wait_until(balanced, 30, what="both relays to hold 8 partitions")
    writing = asyncio.create_task(
        write_events(
            fleet.database_url, fleet.schema, list(topics.values()), total=5_000, keys=200, pace=0.005
        )
    )
    await wait_until(lambda: flowing(fleet, 300), 30, interval=0.1, what="events to flow before SIGTERM")
    leaving.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert leaving.wait(20) == 0, leaving.log()[-3000:]
    held = await leases_by_holder(fleet.database_url, fleet.schema)
    assert leaving.instance_id not in held, f"leases still held after a clean exit: {held}"

    async def all_with_staying() -> bool:
        held = await leases_by_holder(fleet.database_url, fleet.schema)
        return len([n for n in held.get(staying.instance_id, []) if n.startswith("partition:")]) == 16

    await wait_until(all_with_staying, 2 * TTL, interval=0.05, what="takeover after SIGTERM")
    takeover = time.monotonic() - stopped_at
    assert takeover < TTL, f"takeover after SIGTERM took {takeover:.1f}s, not well under the TTL"
    written = await writing
    await drained(fleet)
    result = check_delivery(written, await read_all(stack, topics))
    assert result["duplicates"] == 0, "a clean shutdown settles everything it published"
