"""Fast takeover (relay.liveness) with real relay processes: a killed relay's partitions publish again
within a second, with the default 10 s lease TTL, in LISTEN and in poll-only mode; a frozen relay
(whose database session lives on) still waits for the TTL and keeps per-key order.

Delivery times come from the Redis stream entry ids (the Redis server's clock in ms, on this host),
kill times from this process's wall clock."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as aioredis

from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    Received,
    Written,
    check_delivery,
    leases_by_holder,
    relay_logs,
    wait_until,
)

pytestmark = pytest.mark.slow
PARTITIONS = 16
PROMISE = 1.0  # seconds from the kill until every partition of the killed relay publishes again


@dataclass(frozen=True)
class Committed:
    written: Written
    partition: int
    committed_at: float  # wall clock, just after the commit returned


class Writers:
    """Writers committing continuously (transactions of 10 events over 400 keys) until stopped."""

    def __init__(self, database_url: str, schema: str, topic: str, writers: int = 3, pace: float = 0.01):
        self.url, self.schema, self.topic = database_url, schema, topic
        self.writers, self.pace = writers, pace
        self.committed: list[Committed] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[Committed]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.committed

    async def _run(self) -> None:
        pool = await asyncpg.create_pool(self.url, min_size=self.writers, max_size=self.writers)
        try:
            await asyncio.gather(*(self._writer(pool, n) for n in range(self.writers)))
        finally:
            await pool.close()

    async def _writer(self, pool: asyncpg.Pool, n: int) -> None:
        rng = random.Random(n)
        while not self._stop.is_set():
            keys = [f"k{rng.randrange(n, 400, self.writers)}" for _ in range(10)]  # a key has one writer
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    f"""INSERT INTO "{self.schema}".outbox (topic, key, payload)
                        SELECT $1, k, convert_to(k, 'UTF8') FROM unnest($2::text[]) WITH ORDINALITY AS u(k, n)
                        ORDER BY n RETURNING id, message_id, key, partition""",
                    self.topic,
                    keys,
                )
            at = time.time()
            self.committed += [
                Committed(Written(r["id"], str(r["message_id"]), self.topic, r["key"]), r["partition"], at)
                for r in sorted(rows, key=lambda r: r["id"])
            ]
            await asyncio.sleep(self.pace)


async def stream_entries(redis_url: str, stream: str) -> list[tuple[float, Received]]:
    """(time the entry was added, what) for every entry of the stream, in stream order."""
    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(stream)
    finally:
        await client.aclose()
    out = []
    for entry_id, fields in entries:
        millis = int(entry_id.split(b"-")[0])
        out.append(
            (
                millis / 1000,
                Received(fields[b"message-id"].decode(), stream, fields.get(b"key", b"").decode()),
            )
        )
    return out


async def partitions_of(fleet: Fleet, holder: str) -> set[int]:
    held = await leases_by_holder(fleet.database_url, fleet.schema)
    return {int(name.split(":")[1]) for name in held.get(holder, []) if name.startswith("partition:")}


async def balanced(fleet: Fleet, instances: list[str]) -> bool:
    held = await leases_by_holder(fleet.database_url, fleet.schema)
    counts = [sum(n.startswith("partition:") for n in held.get(i, [])) for i in instances]
    return sum(counts) == PARTITIONS and min(counts) >= PARTITIONS // len(instances)


@pytest.mark.parametrize("listen", ["true", "false"], ids=["listen", "poll-only"])
async def test_a_killed_relays_partitions_publish_again_within_a_second(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], listen: str
) -> None:
    stream = topics["redis"]  # rt.* goes to Redis, whose entry ids carry the time of each publish
    # The default TTL: without fast takeover the victim's partitions would wait ~10 s.
    relays = [fleet.spawn(f"relay-{n}", OUTBOX_LEASE_TTL="10", OUTBOX_LISTEN=listen) for n in range(3)]
    victim = relays[0]
    await wait_until(lambda: balanced(fleet, [r.instance_id for r in relays]), 60, what="a 6/5/5 split")
    writers = Writers(fleet.database_url, fleet.schema, stream)
    writers.start()
    try:
        await asyncio.sleep(2.0)  # flowing, every partition with fresh events
        victim_partitions = await partitions_of(fleet, victim.instance_id)
        assert len(victim_partitions) >= 5, victim_partitions
        killed_at = time.time()
        victim.signal(signal.SIGKILL)
        victim.wait(10)

        async def taken() -> bool:
            return not (await partitions_of(fleet, victim.instance_id)) and await balanced(
                fleet, [r.instance_id for r in relays[1:]]
            )

        await wait_until(taken, 30, interval=0.05, what="the survivors to take the victim's partitions")
        await asyncio.sleep(3.0)  # events keep coming, to every partition
    finally:
        committed = await writers.stop()
    await fleet.wait_drained(60)
    entries = await stream_entries(stack.redis_url, stream)

    # Order and completeness, through the kill.
    result = check_delivery([c.written for c in committed], [r for _, r in entries])
    assert result["delivered"] == len(committed)

    partition_of = {c.written.message_id: c.partition for c in committed}
    # For each of the victim's partitions: the first publish after the kill, by a new owner (a
    # publish the victim had sent just before dying may land a few ms late, hence the 50 ms).
    first_after: dict[int, float] = {}
    for at, received in entries:
        p = partition_of.get(received.message_id)
        if p in victim_partitions and at > killed_at + 0.05 and p not in first_after:
            first_after[p] = at
    assert set(first_after) == victim_partitions, f"partitions never published again: {victim_partitions}"
    gaps = {p: at - killed_at for p, at in first_after.items()}
    worst = max(gaps.values())

    # And what writers see: commit → publish of events of those partitions committed in the first
    # two seconds after the kill.
    delivered_at: dict[str, float] = {}
    for at, received in entries:
        delivered_at.setdefault(received.message_id, at)
    waits = [
        delivered_at[c.written.message_id] - c.committed_at
        for c in committed
        if c.partition in victim_partitions and killed_at <= c.committed_at <= killed_at + 2.0
    ]
    by_partition: dict[int, int] = defaultdict(int)
    for c in committed:
        if c.partition in victim_partitions and c.committed_at >= killed_at:
            by_partition[c.partition] += 1
    print(
        f"fast takeover ({'listen' if listen == 'true' else 'poll-only'}): kill → first publish per"
        f" partition: worst {worst:.3f}s, all {sorted(round(g, 3) for g in gaps.values())};"
        f" commit → publish after the kill: worst {max(waits):.3f}s over {len(waits)} events;"
        f" duplicates {result['duplicates']}"
    )
    assert worst < PROMISE, f"the killed relay's partitions waited {worst:.2f}s\n{relay_logs(fleet)}"
    assert all(by_partition[p] > 0 for p in victim_partitions), by_partition
    assert any("died (its database session ended)" in relay.log() for relay in relays[1:]), relay_logs(fleet)


async def test_a_frozen_relay_still_waits_for_the_ttl_and_keeps_order(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    """SIGSTOP: the frozen process's session and its liveness lock live on, so nothing is taken
    before its leases expire; afterwards fencing keeps per-key order when it wakes up."""
    ttl = 4.0
    stream = topics["redis"]
    a, b = (fleet.spawn(f"relay-{n}", OUTBOX_LEASE_TTL=str(ttl)) for n in "ab")
    await wait_until(lambda: balanced(fleet, [a.instance_id, b.instance_id]), 60, what="an 8/8 split")
    writers = Writers(fleet.database_url, fleet.schema, stream, pace=0.02)
    writers.start()
    try:
        await asyncio.sleep(1.5)
        frozen = await partitions_of(fleet, a.instance_id)
        a.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # Well past fast takeover's reach, well before the TTL could have run out.
            await asyncio.sleep(ttl / 2)
            assert await partitions_of(fleet, a.instance_id) == frozen, "taken before the TTL"

            async def taken() -> bool:
                return not await partitions_of(fleet, a.instance_id)

            await wait_until(taken, ttl * 3, interval=0.05, what="takeover by B after the TTL")
            took = time.monotonic() - frozen_at
            print(f"frozen relay: taken over after {took:.2f}s (TTL {ttl:g}s)")
            assert took >= ttl * 0.6, f"taken over after {took:.2f}s, before the lease could expire"
            await asyncio.sleep(1.0)
        finally:
            a.signal(signal.SIGCONT)
        await wait_until(lambda: balanced(fleet, [a.instance_id, b.instance_id]), 30, what="8/8 again")
    finally:
        committed = await writers.stop()
    await fleet.wait_drained(60)
    entries = await stream_entries(stack.redis_url, stream)
    result = check_delivery([c.written for c in committed], [r for _, r in entries])
    assert result["delivered"] == len(committed)
