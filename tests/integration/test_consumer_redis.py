"""The Redis Streams inbox consumer against real Redis and PostgreSQL (issue 14): once per message
however often delivered, XACK only after the inbox committed, the relay's sharded streams one worker
each, a dead member's entries reclaimed with XAUTOCLAIM, '<stream>:dlq' for entries without
message-id, given up, or delivered too often; SIGTERM lets the handler in progress finish."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import ResponseError

from clients.consumers import ConsumerSettings, RedisInboxConsumer
from clients.inbox import AsyncInbox, InboxMessage
from devtools.embedded import StackEndpoints, free_port
from devtools.fleet import unique_name, wait_until
from tests.consumer_handlers import effects_table_sql, record, record_sync
from tests.integration.test_consumer_kafka import _exists, consume_process

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def effects(pg: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch) -> str:
    table = f"{schema}.effects"
    await pg.execute(effects_table_sql(table))
    monkeypatch.setenv("CONSUMER_TEST_TABLE", table)
    return table


@pytest.fixture
async def client(stack: StackEndpoints) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def settings(stack: StackEndpoints, schema: str, **overrides: Any) -> ConsumerSettings:
    values: dict[str, Any] = {
        "database_url": SecretStr(stack.database_url),
        "schema_name": schema,
        "redis_url": SecretStr(stack.redis_url),
        "consumer_backoff_initial": 0.05,
        "consumer_backoff_max": 0.5,
        "redis_lease_ttl": 2.0,
        **overrides,
    }
    return ConsumerSettings(**values)


def fields(message_id: str | None, key: str, payload: bytes = b"{}") -> dict[str, Any]:
    entry: dict[str, Any] = {"payload": payload, "headers": f'{{"traceparent":"{TRACEPARENT}"}}', "key": key}
    if message_id:
        entry["message-id"] = message_id
    return entry


@contextlib.asynccontextmanager
async def running(consumer: RedisInboxConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 60)


async def effect_ids(pg: asyncpg.Connection, table: str, key: str | None = None) -> list[str]:
    rows = await pg.fetch(f"SELECT message_id, key FROM {table} ORDER BY seq")
    return [r["message_id"] for r in rows if key is None or r["key"] == key]


async def pending(client: aioredis.Redis, stream: str, group: str) -> int:
    """Entries delivered and not acknowledged; -1 before the consumer made the group."""
    try:
        return int((await client.xpending(stream, group))["pending"])
    except ResponseError as exc:
        assert "NOGROUP" in str(exc)
        return -1


async def test_sharded_streams_each_message_once_in_key_order_acknowledged_after(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    topic, group = unique_name("cs."), unique_name("g")
    written: list[tuple[str, str, str]] = []  # (stream, message id, key)
    for n in range(30):
        key = f"k{n % 6}"
        stream = f"{topic}:{n % 6 % 3}"
        message_id = str(uuid.uuid4())
        written.append((stream, message_id, key))
        await client.xadd(stream, fields(message_id, key))
    for stream, message_id, key in written[:10]:  # redelivered copies (a relay crash)
        await client.xadd(stream, fields(message_id, key))
    consumer = RedisInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic], shards=3)
    async with running(consumer):

        async def all_acknowledged() -> bool:
            counts = [await pending(client, f"{topic}:{n}", group) for n in range(3)]
            return len(await effect_ids(pg, effects)) == 30 and counts == [0, 0, 0]

        await wait_until(all_acknowledged, 60, what="every entry processed and acknowledged")
        assert consumer.owned == [f"{topic}:0", f"{topic}:1", f"{topic}:2"]
    ids = await effect_ids(pg, effects)
    assert sorted(ids) == sorted(m for _, m, _ in written)
    for key in {k for _, _, k in written}:
        assert await effect_ids(pg, effects, key) == [m for _, m, k in written if k == key]
    topics = {r["topic"] for r in await pg.fetch(f"SELECT topic FROM {effects}")}
    assert topics == {topic}  # the shard suffix is not part of the topic


async def test_an_entry_is_acknowledged_only_after_the_handler_committed(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    stream, group = unique_name("cs."), unique_name("g")
    await client.xadd(stream, fields(str(uuid.uuid4()), "k"))
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(conn: Any, message: InboxMessage) -> None:
        await record(conn, message)
        entered.set()
        await release.wait()

    consumer = RedisInboxConsumer(settings(stack, schema), group=group, handler=slow, topics=[stream])
    async with running(consumer):
        await asyncio.wait_for(entered.wait(), 60)
        await asyncio.sleep(1.0)
        assert await pending(client, stream, group) == 1
        assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 0
        release.set()

        async def acknowledged() -> bool:
            return await pending(client, stream, group) == 0

        await wait_until(acknowledged, 30, what="the entry acknowledged")
    assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 1


async def test_entries_without_message_id_or_given_up_go_to_the_dead_letter_stream(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    stream, group = unique_name("cs."), unique_name("g")
    poison, good = str(uuid.uuid4()), str(uuid.uuid4())
    await client.xadd(stream, fields(None, "k"))
    await client.xadd(stream, fields(poison, "k", b"poison"))
    await client.xadd(stream, fields(good, "k"))
    inbox = AsyncInbox(group, schema=schema, max_attempts=2)
    consumer = RedisInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[stream], inbox=inbox)
    async with running(consumer) as task:
        await wait_until(lambda: _has(pg, effects, 1), 60, what="the good entry")
        assert not task.done()
    letters = await client.xrange(f"{stream}:dlq")
    reasons = [(f[b"dead-letter-reason"], f.get(b"message-id")) for _, f in letters]
    assert reasons == [(b"missing_message_id", None), (b"gave_up", poison.encode())]
    assert b"poison payload" in letters[1][1][b"dead-letter-detail"]
    assert await pending(client, stream, group) == 0
    assert await effect_ids(pg, effects) == [good]


async def _has(pg: asyncpg.Connection, table: str, count: int) -> bool:
    return int(await pg.fetchval(f"SELECT count(*) FROM {table}")) >= count


async def test_a_dead_members_entries_are_reclaimed_once_idle(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    stream, group = unique_name("cs."), unique_name("g")
    consumer = RedisInboxConsumer(settings(stack, schema, redis_claim_idle=1.0), group=group,
                                  handler=record_sync, topics=[stream])
    async with running(consumer):
        await wait_until(lambda: _owns(consumer, stream), 30, what="the stream owned")
        # A member that does not know the lease (or lost it while frozen) reads entries and dies.
        ids = [str(uuid.uuid4()) for _ in range(3)]
        for message_id in ids:
            await client.xadd(stream, fields(message_id, "k"))
        await client.xreadgroup(group, "dead-member", {stream: ">"}, count=3)
        await asyncio.sleep(0.2)
        await wait_until(lambda: _has(pg, effects, 3), 30, what="the dead member's entries reclaimed")
        assert await pending(client, stream, group) == 0
    assert sorted(await effect_ids(pg, effects)) == sorted(ids)


async def _owns(consumer: RedisInboxConsumer, stream: str) -> bool:
    return stream in consumer.owned


async def test_an_entry_delivered_too_often_goes_to_the_dead_letter_stream(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    stream, group = unique_name("cs."), unique_name("g")
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    crasher, good = str(uuid.uuid4()), str(uuid.uuid4())
    crasher_id = await client.xadd(stream, fields(crasher, "k"))
    await client.xadd(stream, fields(good, "k"))
    # Delivered to members that each died handling it (say it crashes the process): 3 deliveries.
    await client.xreadgroup(group, "dead-1", {stream: ">"}, count=1)
    for member in ("dead-2", "dead-3"):
        await client.xclaim(stream, group, member, 0, [crasher_id])
    consumer = RedisInboxConsumer(settings(stack, schema, redis_max_deliveries=3), group=group, handler=record,
                                  topics=[stream])
    async with running(consumer):
        await wait_until(lambda: _has(pg, effects, 1), 30, what="the entry after it")
    letters = await client.xrange(f"{stream}:dlq")
    assert [(f[b"dead-letter-reason"], f[b"message-id"]) for _, f in letters] == [
        (b"max_deliveries", crasher.encode())
    ]
    assert b"delivered 4 times" in letters[0][1][b"dead-letter-detail"]
    assert await effect_ids(pg, effects) == [good]
    assert await pending(client, stream, group) == 0


async def test_two_members_split_the_shards_and_one_takes_all_when_the_other_stops(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis
) -> None:
    topic, group = unique_name("cs."), unique_name("g")
    one = RedisInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic], shards=4,
                             inbox=AsyncInbox(group, schema=schema, worker_id="one"))
    two = RedisInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic], shards=4,
                             inbox=AsyncInbox(group, schema=schema, worker_id="two"))
    async with running(one):
        async with running(two):

            async def split() -> bool:
                return len(one.owned) == 2 and len(two.owned) == 2

            await wait_until(split, 30, what="two shards each")
            assert set(one.owned).isdisjoint(two.owned)

        async def all_four() -> bool:
            return len(one.owned) == 4

        await wait_until(all_four, 30, what="the remaining member to take every shard")


async def test_sigterm_lets_the_handler_in_progress_finish_and_acknowledge(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    stream, group = unique_name("cs."), unique_name("g")
    await client.xadd(stream, fields(str(uuid.uuid4()), "k"))
    started = tmp_path / "started"
    env = {"CONSUMER_TEST_TABLE": effects, "CONSUMER_TEST_DELAY": "2", "CONSUMER_TEST_STARTED": str(started)}
    process = consume_process(stack, schema, group, stream, env, tmp_path / "consumer.log",
                              "--redis", stream, "tests.consumer_handlers:record")
    try:
        await wait_until(lambda: _exists(started), 60, what="the handler to start")
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "consumer.log").read_text()
    assert code == 0, log
    assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 1, log
    assert await pending(client, stream, group) == 0, log


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series `name` with exactly `labels` in a /metrics page (None: absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


async def test_the_consume_command_serves_processed_and_duplicate_counts_on_metrics(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    import urllib.request

    stream, group = unique_name("cs."), unique_name("g")
    message_id = str(uuid.uuid4())
    for _ in range(3):  # once, and redelivered twice
        await client.xadd(stream, fields(message_id, "k"))
    port = free_port()
    env = {"CONSUMER_TEST_TABLE": effects, "OUTBOX_METRICS_ADDR": f"127.0.0.1:{port}"}
    process = consume_process(stack, schema, group, stream, env, tmp_path / "consumer.log",
                              "--redis", stream, "tests.consumer_handlers:record")

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())

    async def counted() -> bool:
        try:
            text = await asyncio.to_thread(get, "/metrics")
        except OSError:
            return False
        return (sample(text, "outbox_inbox_processed_total", consumer=group, schema=schema) == 1.0
                and sample(text, "outbox_inbox_duplicates_total", consumer=group, schema=schema) == 2.0)

    try:
        await wait_until(counted, 60, what="processed 1 and duplicates 2 (consumer, schema) on /metrics")
        metrics = await asyncio.to_thread(get, "/metrics")
        assert f'outbox_consumer_messages_total{{group="{group}",outcome="duplicate",system="redis"}} 2.0' in metrics
        assert await asyncio.to_thread(get, "/healthz") == "ok\n"
        assert '"redis": true' in await asyncio.to_thread(get, "/readyz")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 1


async def test_database_and_redis_outages_are_waited_out_never_dead_lettered(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, client: aioredis.Redis,
) -> None:
    """The consumer logs in as its own role and reaches Redis through a proxy: the role is locked out
    (its sessions killed), then the proxy cut. Entries written meanwhile wait; nothing goes to the
    dead-letter stream, the consumer keeps running, and every entry takes effect once afterwards."""
    from urllib.parse import urlsplit

    from tests.acceptance.test_database_faults import url_for_role
    from tests.acceptance.test_sink_faults import TcpProxy

    role = f"consumer_{uuid.uuid4().hex[:10]}"
    await pg.execute(f'CREATE ROLE "{role}" LOGIN')
    await pg.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    await pg.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    await pg.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"')
    target = urlsplit(stack.redis_url)
    assert target.hostname and target.port
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    stream, group = unique_name("cs."), unique_name("g")
    consumer = RedisInboxConsumer(
        settings(stack, schema, database_url=SecretStr(url_for_role(stack.database_url, role)),
                 redis_url=SecretStr(f"redis://127.0.0.1:{proxy.port}/0"), redis_lease_ttl=5.0),
        group=group, handler=record, topics=[stream],
    )
    ids: list[str] = []

    async def write(count: int) -> None:
        for _ in range(count):
            ids.append(str(uuid.uuid4()))
            await client.xadd(stream, fields(ids[-1], "k"))

    async def all_done() -> bool:
        return len(await effect_ids(pg, effects)) == len(ids)

    try:
        async with running(consumer) as task:
            await write(5)
            await wait_until(all_done, 30, what="the first entries")
            # The database goes away: logins refused, sessions killed.
            await pg.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
            await write(5)
            await asyncio.sleep(2.0)
            assert not task.done() and len(await effect_ids(pg, effects)) == 5
            await pg.execute(f'ALTER ROLE "{role}" LOGIN')
            await wait_until(all_done, 60, what="the entries written during the database outage")
            # Redis goes away: every connection broken, every new one reset, for a while.
            await proxy.refuse()
            await write(5)
            await asyncio.sleep(2.0)
            assert not task.done()
            proxy.accept()
            await wait_until(all_done, 60, what="the entries written during the Redis outage")
            assert await pending(client, stream, group) == 0
    finally:
        await proxy.cut()
        await pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await pg.execute(f'DROP OWNED BY "{role}"')
        await pg.execute(f'DROP ROLE IF EXISTS "{role}"')
    assert sorted(await effect_ids(pg, effects)) == sorted(ids)
    assert await client.xlen(f"{stream}:dlq") == 0
