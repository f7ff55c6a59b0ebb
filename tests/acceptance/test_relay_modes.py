"""Modes an operator can switch on: retention instead of delete, poll-only (no LISTEN), a DLQ copy
of dead letters, and a Redis topic sharded over several streams by key."""

from __future__ import annotations

import zlib

import asyncpg
import pytest
import redis.asyncio as aioredis

from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    check_delivery,
    pending_count,
    read_redis,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.slow


async def fetchval(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_retain_mode_keeps_published_rows_until_the_leader_cleans_up(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    stream = topics["redis"]
    fleet.spawn("relay-0", OUTBOX_SETTLE_MODE="retain", OUTBOX_RETENTION="3")
    written = await write_events(fleet.database_url, fleet.schema, [stream], total=100, keys=10)
    table = f'"{fleet.schema}".outbox'

    async def published() -> bool:
        return await fetchval(fleet.database_url, f"SELECT count(*) FROM {table} WHERE published_at IS NULL") == 0

    await wait_until(published, 20, what="every row marked published")
    assert await fetchval(fleet.database_url, f"SELECT count(*) FROM {table}") == 100, "rows kept"
    check_delivery(written, await read_redis(stack.redis_url, stream))

    async def cleaned() -> bool:
        return await pending_count(fleet.database_url, fleet.schema) == 0

    # Retention (3 s) plus at most one maintenance round (5 s).
    await wait_until(cleaned, 20, what="the leader's clean-up")
    assert len(await read_redis(stack.redis_url, stream)) == 100, "retained rows were published again"


async def test_poll_only_mode_delivers_without_listen(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    stream = topics["redis"]
    fleet.spawn("relay-0", OUTBOX_LISTEN="false", OUTBOX_POLL_INTERVAL="0.2")
    written = await write_events(fleet.database_url, fleet.schema, [stream], total=200, keys=20)

    async def drained() -> bool:
        return await pending_count(fleet.database_url, fleet.schema) == 0

    await wait_until(drained, 20, what="a poll-only relay to drain")
    check_delivery(written, await read_redis(stack.redis_url, stream))
    conn = await asyncpg.connect(fleet.database_url)
    try:
        sessions = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay-listener'"
        )
    finally:
        await conn.close()
    assert sessions == 0, "a poll-only relay opened a LISTEN session"


async def test_dead_letters_are_copied_to_the_dlq_stream(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    stream = topics["redis"]
    broken = aioredis.from_url(stack.redis_url)
    await broken.set(stream, "not a stream")
    try:
        fleet.spawn("relay-0", OUTBOX_MAX_ATTEMPTS="1", OUTBOX_DLQ_PUBLISH="true")
        written = await write_events(fleet.database_url, fleet.schema, [stream], total=3, keys=3)

        async def copied() -> bool:
            return len(await read_redis(stack.redis_url, f"{stream}.dlq")) >= 3

        await wait_until(copied, 20, what="the DLQ copies")
        entries = await broken.xrange(f"{stream}.dlq")
        assert {fields[b"dead-letter-reason"] for _, fields in entries} == {b"max_attempts"}
        assert {fields[b"message-id"].decode() for _, fields in entries} == {w.message_id for w in written}
        archived = f'SELECT count(*) FROM "{fleet.schema}".dead_letter_archive'
        assert await fetchval(fleet.database_url, archived) == 3
    finally:
        await broken.aclose()


async def test_a_sharded_topic_spreads_keys_over_streams_and_keeps_key_order(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    stream = topics["redis"]
    fleet.spawn("relay-0", OUTBOX_REDIS_SHARDS=f"{stream}=4")
    written = await write_events(fleet.database_url, fleet.schema, [stream], total=400, keys=40)

    async def drained() -> bool:
        return await pending_count(fleet.database_url, fleet.schema) == 0

    await wait_until(drained, 20, what="the sharded topic to drain")
    shards = [await read_redis(stack.redis_url, f"{stream}:{n}") for n in range(4)]
    assert all(shards), "every shard gets some of 40 keys"
    assert await read_redis(stack.redis_url, stream) == [], "nothing goes to the unsharded name"
    for n, received in enumerate(shards):
        assert {zlib.crc32(r.key.encode()) % 4 for r in received} == {n}, "a key lives in one shard"
    check_delivery(written, [r for shard in shards for r in shard])
