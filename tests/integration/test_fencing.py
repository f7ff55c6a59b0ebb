"""Leases, fencing tokens and the claim query, driven through RelayStore against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.pauses import glob_to_like
from relay.store import Fence, RelayStore

PARTITIONS = 16
MAX_BYTES = 8 * 2**20  # the default OUTBOX_CLAIM_MAX_BYTES: far above these tests' rows


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[RelayStore]:
    s = RelayStore(database_url, schema, pool_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def keys_in_partition(pg: asyncpg.Connection, partition: int, count: int) -> list[str]:
    """Keys the outbox's generated column puts into `partition` (same formula as the migration)."""
    rows = await pg.fetch(
        """SELECT k FROM (SELECT 'key-' || g AS k, g FROM generate_series(0, 5000) g) s
           WHERE (hashtext(k)::bigint & 2147483647) % $1 = $2 ORDER BY g LIMIT $3""",
        PARTITIONS,
        partition,
        count,
    )
    assert len(rows) == count
    return [r["k"] for r in rows]


async def insert(
    pg: asyncpg.Connection, schema: str, topic: str, key: str | None, partition: int | None = None
) -> int:
    record = await pg.fetchrow(
        f'INSERT INTO "{schema}".outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4::jsonb) '
        "RETURNING id, partition",
        topic,
        key,
        f"payload of {topic}/{key}".encode(),
        json.dumps({"h": "v"}),
    )
    if partition is not None:
        assert record["partition"] == partition, "keys_in_partition disagrees with the outbox"
    return int(record["id"])


async def outbox_rows(pg: asyncpg.Connection, schema: str) -> dict[int, asyncpg.Record]:
    rows = await pg.fetch(f'SELECT * FROM "{schema}".outbox ORDER BY id')
    return {r["id"]: r for r in rows}


async def expire(pg: asyncpg.Connection, schema: str, name: str) -> None:
    await pg.execute(
        f"UPDATE \"{schema}\".distributed_locks SET expires_at = now() - interval '1 second' WHERE name = $1",
        name,
    )


async def fence_for(store: RelayStore, name: str, holder: str, ttl: float = 30.0) -> Fence:
    token = await store.acquire_lease(name, holder, ttl)
    assert token is not None, f"{holder} could not take {name}"
    return Fence(name, holder, token)


# -- leases and tokens -------------------------------------------------------------------------


async def test_a_lease_has_one_holder_until_it_expires_and_tokens_only_grow(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    assert await store.acquire_lease("partition:0", "a", 30) == 1
    assert await store.acquire_lease("partition:0", "b", 30) is None, "held leases are not shared"

    assert await store.acquire_lease("partition:1", "a", 0.2) == 1
    assert await store.acquire_lease("partition:1", "b", 30) is None
    await asyncio.sleep(0.4)
    assert await store.acquire_lease("partition:1", "b", 30) == 2, "an expired lease is free"
    assert await store.acquire_lease("partition:1", "a", 30) is None, "the old holder lost it"

    await store.release_leases(["partition:1"], [1], "b")  # a stale token releases nothing
    assert await store.acquire_lease("partition:1", "c", 30) is None
    await store.release_leases(["partition:1"], [2], "b")
    assert await store.acquire_lease("partition:1", "a", 30) == 3, "the token grows after a release too"
    await expire(pg, schema, "partition:1")
    assert await store.acquire_lease("partition:1", "a", 30) == 4, "and on re-acquiring one's own"
    assert sorted(await store.claimable_partitions(PARTITIONS)) == list(range(2, PARTITIONS))


async def test_renew_returns_only_the_leases_still_held(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    kept = await fence_for(store, "partition:0", "a", ttl=2)
    lapsed = await fence_for(store, "partition:1", "a")
    taken = await fence_for(store, "partition:2", "a")
    released = await fence_for(store, "partition:3", "a")
    await expire(pg, schema, lapsed.lease_name)
    await expire(pg, schema, taken.lease_name)
    assert await store.acquire_lease(taken.lease_name, "b", 30) == 2
    await store.release_leases([released.lease_name], [released.token], "a")

    fences = [kept, lapsed, taken, released]
    renewed = await store.renew_leases([f.lease_name for f in fences], [f.token for f in fences], "a", 30)
    assert renewed == {"partition:0"}
    remaining = await pg.fetchval(
        f"SELECT extract(epoch FROM expires_at - now()) FROM \"{schema}\".distributed_locks WHERE name = 'partition:0'"
    )
    assert remaining > 20, "renewal extends the lease by the TTL"
    assert await store.renew_leases(["partition:0"], [kept.token + 1], "a", 30) == set(), "wrong token"
    assert await store.renew_leases(["partition:0"], [kept.token], "b", 30) == set(), "wrong holder"
    assert await store.renew_leases(["partition:2"], [2], "b", 30) == {"partition:2"}


# -- fencing of the relay path -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["expired", "taken_over"])
async def test_a_stale_fence_changes_nothing(
    store: RelayStore, pg: asyncpg.Connection, schema: str, how: str
) -> None:
    lease = "partition:5"
    fence = await fence_for(store, lease, "a")
    keys = await keys_in_partition(pg, 5, 3)
    ids = [await insert(pg, schema, "orders", key, 5) for key in keys]
    claimed = await store.claim_batch(5, 10, [], fence, max_bytes=MAX_BYTES)
    assert [r.id for r in claimed] == ids

    await expire(pg, schema, lease)
    if how == "taken_over":
        new_owner = await fence_for(store, lease, "b")
        assert new_owner.token == fence.token + 1
    before = await outbox_rows(pg, schema)

    assert await store.claim_batch(5, 10, [], fence, max_bytes=MAX_BYTES) == []
    assert await store.settle(ids[:1], fence, retain=False) == 0
    assert await store.settle(ids[:1], fence, retain=True) == 0
    assert await store.record_failures(ids[1:2], [0.0], ["boom"], fence) == 0
    assert await store.dead_letter(ids[2:], ["max_attempts"], ["boom"], fence) == []

    assert await outbox_rows(pg, schema) == before, "a stale fence must not change any row"
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".dead_letter_archive') == 0

    if how == "taken_over":  # the new owner's fence works on the same rows
        assert [r.id for r in await store.claim_batch(5, 10, [], new_owner, max_bytes=MAX_BYTES)] == ids
        assert await store.settle(ids, new_owner, retain=False) == 3


async def test_a_valid_fence_settles_retries_and_dead_letters(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    fence = await fence_for(store, "partition:7", "a")
    keys = await keys_in_partition(pg, 7, 4)
    ids = [await insert(pg, schema, "orders", key, 7) for key in keys]
    assert len(await store.claim_batch(7, 10, [], fence, max_bytes=MAX_BYTES)) == 4

    assert await store.settle(ids[:1], fence, retain=False) == 1
    assert await store.settle(ids[1:2], fence, retain=True) == 1
    assert await store.record_failures(ids[2:3], [60.0], ["x" * 5000], fence) == 1
    archived = await store.dead_letter(ids[3:], ["record_too_large"], ["too big"], fence)
    assert [(a.outbox_id, a.reason) for a in archived] == [(ids[3], "record_too_large")]

    rows = await outbox_rows(pg, schema)
    assert ids[0] not in rows, "delete mode removes the row"
    assert rows[ids[1]]["published_at"] is not None, "retain mode marks it published"
    failed = rows[ids[2]]
    assert failed["attempts"] == 1
    assert len(failed["last_error"]) == 2000, "errors are truncated"
    assert failed["first_attempt_at"] is not None and failed["last_attempt_at"] is not None
    wait = await pg.fetchval(
        f'SELECT extract(epoch FROM next_attempt_at - now()) FROM "{schema}".outbox WHERE id = $1', ids[2]
    )
    assert 55 < wait <= 60
    assert ids[3] not in rows
    # Nothing published or waiting is claimed again.
    assert await store.claim_batch(7, 10, [], fence, max_bytes=MAX_BYTES) == []


async def test_dead_letter_moves_the_row_in_one_step(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    fence = await fence_for(store, "partition:3", "relay-a")
    [key] = await keys_in_partition(pg, 3, 1)
    event_id = await insert(pg, schema, "payments", key, 3)
    original = (await outbox_rows(pg, schema))[event_id]
    assert await store.record_failures([event_id], [0.0], ["first failure"], fence) == 1

    archived = await store.dead_letter([event_id], ["max_attempts"], ["second failure"], fence)
    assert len(archived) == 1 and archived[0].outbox_id == event_id
    assert event_id not in await outbox_rows(pg, schema)
    entry = await pg.fetchrow(f'SELECT * FROM "{schema}".dead_letter_archive')
    assert entry["id"] == archived[0].archive_id
    assert entry["outbox_id"] == event_id
    assert entry["message_id"] == original["message_id"]
    assert (entry["topic"], entry["key"], entry["payload"]) == ("payments", key, original["payload"])
    assert json.loads(entry["headers"]) == {"h": "v"}
    assert entry["reason"] == "max_attempts"
    assert entry["last_error"] == "second failure"
    assert entry["attempts"] == 2, "the attempt that just failed is counted"
    assert entry["archived_by"] == "relay-a"
    assert entry["first_attempt_at"] is not None and entry["last_attempt_at"] is not None
    assert await store.dead_letter([event_id], ["max_attempts"], ["again"], fence) == []
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".dead_letter_archive') == 1


# -- the claim query ---------------------------------------------------------------------------


async def test_claim_takes_the_oldest_rows_of_its_partition_in_id_order(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    fence = await fence_for(store, "partition:2", "a")
    keys = await keys_in_partition(pg, 2, 5)
    other = (await keys_in_partition(pg, 9, 1))[0]
    ids = []
    for n in range(30):
        ids.append(await insert(pg, schema, f"t{n % 3}", keys[(n * 7) % 5], 2))
        await insert(pg, schema, "t0", other, 9)
    assert [r.id for r in await store.claim_batch(2, 10, [], fence, max_bytes=MAX_BYTES)] == ids[:10]
    assert [r.id for r in await store.claim_batch(2, 100, [], fence, max_bytes=MAX_BYTES)] == ids
    other_fence = await fence_for(store, "partition:9", "a")
    assert len(await store.claim_batch(9, 100, [], other_fence, max_bytes=MAX_BYTES)) == 30, (
        "each partition is claimed alone"
    )


async def test_claim_skips_paused_topic_patterns(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    fence = await fence_for(store, "partition:4", "a")
    [key] = await keys_in_partition(pg, 4, 1)
    topics = ["orders.created", "orders.paid", "billing", "a_b", "axb", "100%", "1000", "ordersXpaid"]
    ids = {topic: await insert(pg, schema, topic, key, 4) for topic in topics}
    paused = [glob_to_like(p) for p in ("orders.*", "a_b", "100%")]
    claimed = await store.claim_batch(4, 100, paused, fence, max_bytes=MAX_BYTES)
    assert [r.topic for r in claimed] == ["billing", "axb", "1000", "ordersXpaid"]
    assert [r.id for r in claimed] == sorted(r.id for r in claimed)
    assert await store.claim_batch(4, 100, [glob_to_like("*")], fence, max_bytes=MAX_BYTES) == []
    everything = await store.claim_batch(4, 100, [], fence, max_bytes=MAX_BYTES)
    assert [r.id for r in everything] == sorted(ids.values())


async def test_a_row_waiting_for_its_retry_holds_back_only_its_own_key(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    fence = await fence_for(store, "partition:6", "a")
    k, j = await keys_in_partition(pg, 6, 2)
    k1 = await insert(pg, schema, "orders", k, 6)
    j1 = await insert(pg, schema, "orders", j, 6)
    k2 = await insert(pg, schema, "orders", k, 6)
    k_other_topic = await insert(pg, schema, "invoices", k, 6)
    j2 = await insert(pg, schema, "orders", j, 6)
    k3 = await insert(pg, schema, "orders", k, 6)
    assert await store.record_failures([k1], [3600.0], ["down"], fence) == 1

    claimed = await store.claim_batch(6, 100, [], fence, max_bytes=MAX_BYTES)
    assert [r.id for r in claimed] == [j1, k_other_topic, j2]

    await pg.execute(
        f"UPDATE \"{schema}\".outbox SET next_attempt_at = now() - interval '1 second' WHERE id = $1", k1
    )
    claimed = await store.claim_batch(6, 100, [], fence, max_bytes=MAX_BYTES)
    assert [r.id for r in claimed] == [k1, j1, k2, k_other_topic, j2, k3]
    assert claimed[0].attempts == 1 and all(r.attempts == 0 for r in claimed[1:])


async def test_keyless_rows_waiting_for_a_retry_hold_back_nothing(
    store: RelayStore, pg: asyncpg.Connection, schema: str
) -> None:
    for partition in range(PARTITIONS):
        await fence_for(store, f"partition:{partition}", "a")
    ids = [await insert(pg, schema, "orders", None) for _ in range(40)]
    rows = await pg.fetch(f'SELECT id, partition FROM "{schema}".outbox ORDER BY id')
    by_partition: dict[int, list[int]] = {}
    for r in rows:
        by_partition.setdefault(r["partition"], []).append(r["id"])
    partition, members = max(by_partition.items(), key=lambda item: len(item[1]))
    assert len(members) >= 2
    fence = Fence(f"partition:{partition}", "a", 1)
    assert await store.record_failures(members[:1], [3600.0], ["down"], fence) == 1
    claimed = await store.claim_batch(partition, 100, [], fence, max_bytes=MAX_BYTES)
    assert [r.id for r in claimed] == members[1:]
    assert len(ids) == 40
