"""settle_delete_and_claim / settle_retain_and_claim (relay/sql/queries.sql) against real
PostgreSQL: the previous batch is marked done and the next one claimed in one statement, under the
same lease fence, and the rows being settled are never claimed again by it."""

from __future__ import annotations

import asyncpg
import pytest

from relay.store import Fence, RelayStore
from tests.integration.test_claim_budget import KIB, PARTITION, fence, insert, keys, store

__all__ = ["fence", "keys", "store"]  # fixtures


@pytest.mark.parametrize("retain", [False, True])
async def test_the_previous_batch_is_settled_and_the_next_claimed_in_one_statement(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str], retain: bool
) -> None:
    ids = [await insert(pg, schema, keys[n % 3], 1 * KIB) for n in range(6)]
    first = await store.claim_batch(PARTITION, 2, [], fence, max_bytes=2**20)
    assert [r.id for r in first] == ids[:2]

    settled, second = await store.settle_and_claim(
        ids[:2], PARTITION, 2, [], fence, retain=retain, max_bytes=2**20
    )
    assert settled == 2
    assert [r.id for r in second] == ids[2:4], "the settled rows are not claimed again"
    if retain:
        done = await pg.fetch(
            f'SELECT id FROM "{schema}".outbox WHERE published_at IS NOT NULL ORDER BY id'
        )
        assert [r["id"] for r in done] == ids[:2]
    else:
        left = await pg.fetch(f'SELECT id FROM "{schema}".outbox ORDER BY id')
        assert [r["id"] for r in left] == ids[2:]

    settled, third = await store.settle_and_claim(
        ids[2:4], PARTITION, 500, [], fence, retain=retain, max_bytes=2**20
    )
    assert (settled, [r.id for r in third]) == (2, ids[4:])
    settled, nothing = await store.settle_and_claim(
        ids[4:], PARTITION, 500, [], fence, retain=retain, max_bytes=2**20
    )
    assert (settled, nothing) == (2, []), "nothing to claim still reports what was settled"


async def test_the_rows_of_a_claim_are_the_ones_claim_batch_would_return(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    """Same budget, same order, same held-back keys as the plain claim."""
    first = await insert(pg, schema, keys[0], 10 * KIB)
    later = await insert(pg, schema, keys[0], 10 * KIB)
    others = [await insert(pg, schema, keys[1 + n], 10 * KIB) for n in range(4)]
    assert await store.record_failures([first], [60.0], ["boom"], fence) == 1
    plain = [r.id for r in await store.claim_batch(PARTITION, 500, [], fence, max_bytes=25 * KIB)]
    settled, combined = await store.settle_and_claim(
        [], PARTITION, 500, [], fence, retain=False, max_bytes=25 * KIB
    )
    assert settled == 0
    assert [r.id for r in combined] == plain == others[:2]
    assert later not in plain


async def test_a_stale_fence_settles_nothing_and_claims_nothing(
    store: RelayStore, pg: asyncpg.Connection, schema: str, fence: Fence, keys: list[str]
) -> None:
    ids = [await insert(pg, schema, keys[0], 1 * KIB) for _ in range(3)]
    stale = Fence(fence.lease_name, fence.holder, fence.token + 1)
    for retain in (False, True):
        assert await store.settle_and_claim(
            ids[:1], PARTITION, 500, [], stale, retain=retain, max_bytes=2**20
        ) == (0, [])
    count = await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox WHERE published_at IS NULL')
    assert count == 3
