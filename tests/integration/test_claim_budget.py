"""The claim's byte budget (OUTBOX_CLAIM_MAX_BYTES) and its skipped topics, against real PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.pauses import glob_to_like
from relay.store import Fence, RelayStore

PARTITION = 3
KIB = 1024


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[RelayStore]:
    s = RelayStore(database_url, schema, pool_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def fence(store: RelayStore) -> Fence:
    name = f"partition:{PARTITION}"
    token = await store.acquire_lease(name, "a", 30.0)
    assert token is not None
    return Fence(name, "a", token)


@pytest.fixture
async def keys(pg: asyncpg.Connection) -> list[str]:
    """Distinct keys that all land in PARTITION (same formula as the outbox's generated column)."""
    rows = await pg.fetch(
        """SELECT k FROM (SELECT 'key-' || g AS k, g FROM generate_series(0, 5000) g) s
           WHERE (hashtext(k)::bigint & 2147483647) % 16 = $1 ORDER BY g LIMIT 40""",
        PARTITION,
    )
    return [r["k"] for r in rows]


async def insert(
    pg: asyncpg.Connection,
    schema: str,
    key: str,
    size: int,
    topic: str = "orders",
    headers: dict[str, str] | None = None,
) -> int:
    record = await pg.fetchrow(
        f'INSERT INTO "{schema}".outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4::jsonb) '
        "RETURNING id, partition",
        topic,
        key,
        os.urandom(size),  # incompressible: stored TOASTed out of line, not compressed
        json.dumps(headers or {}),
    )
    assert record["partition"] == PARTITION
    return int(record["id"])


async def test_a_claim_returns_the_id_ordered_prefix_within_the_byte_budget(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    ids = [await insert(pg, schema, keys[i], 100 * KIB) for i in range(10)]

    claimed = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB)

    assert [r.id for r in claimed] == ids[:3]
    assert all(len(r.payload) == 100 * KIB for r in claimed)
    # Claiming again without settling returns the same rows: the budget picks a prefix, nothing more.
    again = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB)
    assert [r.id for r in again] == ids[:3]

    drained: list[list[int]] = []
    while batch := await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB):
        drained.append([r.id for r in batch])
        assert await store.settle([r.id for r in batch], fence, retain=False) == len(batch)
    assert drained == [ids[0:3], ids[3:6], ids[6:9], ids[9:10]]


async def test_the_row_limit_still_applies_under_the_byte_budget(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    ids = [await insert(pg, schema, keys[i], 100) for i in range(10)]
    assert [r.id for r in await store.claim_batch(PARTITION, 4, [], fence, max_bytes=2**20)] == ids[:4]
    assert [r.id for r in await store.claim_batch(PARTITION, 500, [], fence, max_bytes=2**20)] == ids


async def test_an_event_larger_than_the_budget_moves_alone(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    small = await insert(pg, schema, keys[0], 10 * KIB)
    big = await insert(pg, schema, keys[1], 1024 * KIB)
    after = [await insert(pg, schema, keys[i], 10 * KIB) for i in (2, 3)]

    first = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB)
    assert [r.id for r in first] == [small], "the big event does not fit behind the small one"
    await store.settle([small], fence, retain=False)

    alone = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB)
    assert [r.id for r in alone] == [big], "at least one row, however large; nothing after it"
    assert len(alone[0].payload) == 1024 * KIB
    await store.settle([big], fence, retain=False)

    rest = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=350 * KIB)
    assert [r.id for r in rest] == after


async def test_keys_and_headers_count_against_the_budget(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    headers = {"trace": "t" * (40 * KIB)}
    ids = [await insert(pg, schema, keys[i], 1, headers=headers) for i in range(4)]
    claimed = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=100 * KIB)
    assert [r.id for r in claimed] == ids[:2]
    assert claimed[0].headers == headers


async def test_skipped_topics_are_left_alone(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    topics = ["orders", "notify.email", "billing", "notify.sms"]
    by_topic = {
        t: [await insert(pg, schema, keys[i * 4 + j], 100, topic=t) for j in range(2)]
        for i, t in enumerate(topics)
    }

    claimed = await store.claim_batch(
        PARTITION, 500, [], fence, max_bytes=2**20, skip_topics=["notify.email", "billing"]
    )
    assert [r.id for r in claimed] == sorted(by_topic["orders"] + by_topic["notify.sms"])
    assert {r.topic for r in claimed} == {"orders", "notify.sms"}

    # Skipped topics are exact names, not patterns; they combine with pauses (LIKE patterns).
    claimed = await store.claim_batch(
        PARTITION, 500, [glob_to_like("notify.*")], fence, max_bytes=2**20, skip_topics=["notify"]
    )
    assert {r.topic for r in claimed} == {"orders", "billing"}
    assert await store.claim_batch(PARTITION, 500, [], fence, max_bytes=2**20, skip_topics=topics) == []
    everything = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=2**20, skip_topics=())
    assert len(everything) == 8


async def test_the_budget_does_not_unblock_a_key_waiting_for_a_retry(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    first = await insert(pg, schema, keys[0], 10 * KIB)
    later = await insert(pg, schema, keys[0], 10 * KIB)
    other = await insert(pg, schema, keys[1], 10 * KIB)
    assert await store.record_failures([first], [60.0], ["boom"], fence) == 1

    claimed = await store.claim_batch(PARTITION, 500, [], fence, max_bytes=15 * KIB)
    assert [r.id for r in claimed] == [other], "the key's later event stays behind its retry"
    assert later not in [r.id for r in claimed]


async def test_a_stale_fence_claims_nothing_whatever_the_budget(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    await insert(pg, schema, keys[0], 10 * KIB)
    stale = Fence(fence.lease_name, fence.holder, fence.token + 1)
    assert await store.claim_batch(PARTITION, 500, [], stale, max_bytes=2**30) == []
