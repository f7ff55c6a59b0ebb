"""The control plane end to end: real relay processes serving it (`run` with OUTBOX_CONTROL_ADDR),
the Python client over real gRPC, and what actually reaches the brokers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter

import asyncpg
import pytest
import redis.asyncio as aioredis

from clients import AsyncControlClient
from clients.control import FailedPrecondition
from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    RelayProcess,
    all_obey,
    check_delivery,
    create_kafka_topic,
    pending_count,
    read_kafka,
    read_redis,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_fleet(fleet: Fleet, **env: str) -> tuple[list[RelayProcess], AsyncControlClient]:
    addr = f"127.0.0.1:{free_port()}"
    relays = [fleet.spawn("relay-a", OUTBOX_CONTROL_ADDR=addr, **env), fleet.spawn("relay-b", **env)]
    client = AsyncControlClient(addr, timeout=5, retries=10)

    async def serving() -> bool:
        try:
            status = await client.status()
        except Exception:
            return False
        return len(status.instances) == 2

    await wait_until(serving, 30, what="the control plane and both relays")
    return relays, client


async def test_pause_stops_publishing_within_2s_and_resume_restarts_it(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    relays, client = await start_fleet(fleet)
    kafka, redis_stream = topics["kafka"], topics["redis"]
    async with client:
        await client.pause("kt.*", reason="test: per-topic pause")
        await all_obey(relays, {"kt.*"}, timeout=2)  # the promise: every instance obeys within 2 s
        paused = await write_events(fleet.database_url, fleet.schema, [kafka], total=200, keys=20)
        flowing = await write_events(fleet.database_url, fleet.schema, [redis_stream], total=200, keys=20)

        async def redis_arrived() -> bool:
            return len(await read_redis(stack.redis_url, redis_stream)) >= 200

        await wait_until(redis_arrived, 15, what="the unpaused topic to keep flowing")
        await asyncio.sleep(1)
        assert await read_kafka(stack.kafka_bootstrap, kafka) == [], "a paused topic was published"
        assert await pending_count(fleet.database_url, fleet.schema) == 200

        await client.resume("kt.*")

        async def drained() -> bool:
            return await pending_count(fleet.database_url, fleet.schema) == 0

        took = await wait_until(drained, 15, interval=0.1, what="resume")
        assert took < 3, f"resume took {took:.1f}s"
        check_delivery(paused, await read_kafka(stack.kafka_bootstrap, kafka))
        check_delivery(flowing, await read_redis(stack.redis_url, redis_stream))

        await client.pause(reason="test: global pause")
        await all_obey(relays, {"*"}, timeout=2)
        held = await write_events(fleet.database_url, fleet.schema, [redis_stream], total=50, keys=5)
        await asyncio.sleep(2)
        assert len(await read_redis(stack.redis_url, redis_stream)) == 200, "published while paused"
        await client.resume()
        await wait_until(drained, 15, interval=0.1, what="resume after a global pause")
        check_delivery(flowing + held, await read_redis(stack.redis_url, redis_stream))


async def replayed_copies(redis_url: str, stream: str) -> Counter[str]:
    """How many times each original message id was replayed into the stream."""
    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(stream)
    finally:
        await client.aclose()
    headers = (json.loads(fields[b"headers"]) for _, fields in entries)
    return Counter(h["x-replayed-from"] for h in headers if "x-replayed-from" in h)


async def test_replays_publish_each_dead_letter_once_unless_forced(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    stream = topics["redis"]
    broken = aioredis.from_url(stack.redis_url)
    await broken.set(stream, "not a stream")  # XADD fails: WRONGTYPE, and one attempt is all we allow
    _, client = await start_fleet(fleet, OUTBOX_MAX_ATTEMPTS="1")
    async with client:
        written = await write_events(fleet.database_url, fleet.schema, [stream], total=5, keys=5)

        async def archived() -> bool:
            return len((await client.dead_letters(topic=stream)).items) == 5

        await wait_until(archived, 20, what="five dead letters")
        await broken.delete(stream)
        await broken.aclose()
        dead = (await client.dead_letters(topic=stream)).items
        ids = [d.id for d in dead]
        originals = {str(w.message_id) for w in written}

        dry = await client.replay(ids=ids, dry_run=True)
        assert (dry.replayed_count, dry.dry_run) == (5, True)
        assert await pending_count(fleet.database_url, fleet.schema) == 0, "a dry run changed something"

        first = await client.replay("replay-1", ids=ids)
        again = await client.replay("replay-1", ids=ids)  # a retried request: same answer, nothing new
        other = await client.replay("replay-2", ids=ids)  # a new request for the same dead letters
        concurrent = await asyncio.gather(*(client.replay(f"replay-c{n}", ids=ids) for n in range(3)))
        assert first.replayed_count == 5 and again == first
        assert other.replayed_count == 0 and other.skipped_already_replayed_count == 5
        assert all(r.replayed_count == 0 for r in concurrent)

        async def published(count: int) -> bool:
            return sum((await replayed_copies(stack.redis_url, stream)).values()) >= count

        await wait_until(lambda: published(5), 20, what="the replays to be published")
        await asyncio.sleep(1)
        copies = await replayed_copies(stack.redis_url, stream)
        assert copies == Counter(dict.fromkeys(originals, 1)), copies

        forced = await client.replay("replay-forced", ids=ids, force=True)
        assert forced.replayed_count == 5
        await wait_until(lambda: published(10), 20, what="the forced replay")
        assert await replayed_copies(stack.redis_url, stream) == Counter(dict.fromkeys(originals, 2))


async def test_locks_show_running_instances_and_a_stale_release_is_refused(
    stack: StackEndpoints, fleet: Fleet
) -> None:
    relays, client = await start_fleet(fleet)
    async with client:

        async def balanced() -> bool:
            holders = Counter(lock.holder for lock in await client.locks() if lock.name.startswith("partition:"))
            return holders == Counter({"relay-a": 8, "relay-b": 8})

        await wait_until(balanced, 30, what="both relays to hold their share")
        lock = next(lock for lock in await client.locks() if lock.name == "partition:0")
        assert lock.holder in {r.instance_id for r in relays} and not lock.expired
        other = "relay-b" if lock.holder == "relay-a" else "relay-a"
        with pytest.raises(FailedPrecondition):
            await client.release_lock("partition:0", expected_holder=other)
        with pytest.raises(FailedPrecondition):
            await client.release_lock("partition:0", expected_token=lock.token + 1)
        conn = await asyncpg.connect(fleet.database_url)
        try:
            holder = await conn.fetchval(
                f'SELECT holder FROM "{fleet.schema}".distributed_locks WHERE name = $1', "partition:0"
            )
        finally:
            await conn.close()
        assert holder == lock.holder, "a refused release changed the lease"
        released = await client.release_lock("partition:0", expected_holder=lock.holder, expected_token=lock.token)
        assert released.holder is None or released.name == "partition:0"


