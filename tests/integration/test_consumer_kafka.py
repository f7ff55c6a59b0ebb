"""The Kafka inbox consumer against the real broker and PostgreSQL (issue 14): each message's business
effect happens once however often it is delivered; an offset is committed only after the inbox's
transaction committed; a message without message-id is logged, counted and passed, never processed;
a handler that keeps failing is given up and its offset committed; SIGTERM lets the handler in
progress finish and commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from clients.consumers import ConsumerSettings, KafkaInboxConsumer
from clients.inbox import InboxMessage
from devtools.embedded import StackEndpoints
from devtools.fleet import RELAY_BIN, create_kafka_topic, unique_name, wait_until
from tests.consumer_handlers import effects_table_sql, record

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def effects(pg: asyncpg.Connection, schema: str) -> str:
    table = f"{schema}.effects"
    await pg.execute(effects_table_sql(table))
    return table


@pytest.fixture
async def topic(stack: StackEndpoints) -> str:
    name = unique_name("ct.")
    await create_kafka_topic(stack.kafka_bootstrap, name, partitions=2)
    return name


def settings(stack: StackEndpoints, schema: str, **overrides: Any) -> ConsumerSettings:
    values: dict[str, Any] = {
        "database_url": SecretStr(stack.database_url),
        "schema_name": schema,
        "kafka_bootstrap": stack.kafka_bootstrap,
        "kafka_session_timeout": 6.0,
        "consumer_backoff_initial": 0.05,
        "consumer_backoff_max": 0.5,
        **overrides,
    }
    return ConsumerSettings(**values)


async def produce(bootstrap: str, topic: str, records: list[tuple[str | None, str, bytes]]) -> None:
    """(message id or None for no header, key, payload) in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for message_id, key, payload in records:
            headers = [("message-id", message_id.encode())] if message_id else [("other", b"x")]
            headers.append(("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
            await producer.send_and_wait(topic, payload, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 2) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def running(consumer: KafkaInboxConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 60)


async def effect_rows(pg: asyncpg.Connection, table: str) -> list[asyncpg.Record]:
    return await pg.fetch(f"SELECT message_id, key FROM {table} ORDER BY seq")


async def test_each_message_is_processed_once_and_offsets_are_committed_after(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUMER_TEST_TABLE", effects)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    # Every message twice (a redelivery after a relay crash), the copies after the originals.
    records = [(i, f"k{n % 5}", b"{}") for n, i in enumerate(ids)]
    await produce(stack.kafka_bootstrap, topic, records + records)
    group = unique_name("g")
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic])
    async with running(consumer):

        async def all_committed() -> bool:
            offsets = await committed(stack.kafka_bootstrap, group, topic)
            return sum(o or 0 for o in offsets.values()) == 40

        await wait_until(all_committed, 60, what="every offset committed")
    rows = await effect_rows(pg, effects)
    assert sorted(r["message_id"] for r in rows) == sorted(ids)  # once each
    outcomes = await pg.fetch(f'SELECT status, count(*) AS n FROM "{schema}".inbox GROUP BY status')
    assert {r["status"]: r["n"] for r in outcomes} == {"processed": 20}
    # Per key, in the order written.
    for key in {k for _, k, _ in records}:
        assert [r["message_id"] for r in rows if r["key"] == key] == [i for i, k, _ in records if k == key]


async def test_a_restarted_group_resumes_after_what_it_committed(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUMER_TEST_TABLE", effects)
    first = [(str(uuid.uuid4()), "k", b"{}") for _ in range(5)]
    second = [(str(uuid.uuid4()), "k", b"{}") for _ in range(5)]
    group = unique_name("g")
    await produce(stack.kafka_bootstrap, topic, first)
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic])
    async with running(consumer):
        await wait_until(lambda: _count(pg, effects, 5), 60, what="the first five")
    await produce(stack.kafka_bootstrap, topic, second)
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic])
    seen: list[str] = []
    process = consumer.inbox.process

    async def counting(conn: Any, message: InboxMessage, handler: Any) -> Any:
        seen.append(message.message_id)
        return await process(conn, message, handler)

    consumer.processor.inbox.process = counting  # type: ignore[method-assign]
    async with running(consumer):
        await wait_until(lambda: _count(pg, effects, 10), 60, what="the next five")
    # Nothing of the first five was delivered again: they were committed, not merely de-duplicated.
    assert seen == [i for i, _, _ in second]
    assert [r["message_id"] for r in await effect_rows(pg, effects)] == [i for i, _, _ in first + second]


async def _count(pg: asyncpg.Connection, table: str, expected: int) -> bool:
    return int(await pg.fetchval(f"SELECT count(*) FROM {table}")) >= expected


async def test_the_offset_is_committed_only_after_the_handler_committed(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str,
) -> None:
    message_id = str(uuid.uuid4())
    await produce(stack.kafka_bootstrap, topic, [(message_id, "k", b"{}")])
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(conn: Any, message: InboxMessage) -> None:
        await conn.execute(f"INSERT INTO {effects} (message_id, topic, key, consumer) VALUES ($1, $2, $3, 'x')",
                           message.message_id, message.topic, message.key)
        entered.set()
        await release.wait()

    group = unique_name("g")
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=slow, topics=[topic])
    async with running(consumer):
        await asyncio.wait_for(entered.wait(), 60)
        await asyncio.sleep(1.0)  # give a wrong early commit time to happen
        assert set((await committed(stack.kafka_bootstrap, group, topic)).values()) == {None}
        assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 0  # not committed yet either
        release.set()

        async def one_committed() -> bool:
            return sum(o or 0 for o in (await committed(stack.kafka_bootstrap, group, topic)).values()) == 1

        await wait_until(one_committed, 30, what="the offset committed")
    assert await pg.fetchval(f"SELECT count(*) FROM {effects}") == 1


async def test_a_message_without_message_id_is_reported_and_passed_never_processed(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CONSUMER_TEST_TABLE", effects)
    good = str(uuid.uuid4())
    await produce(stack.kafka_bootstrap, topic, [(None, "k", b"{}"), (good, "k", b"{}")])
    group = unique_name("g")
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic])
    with caplog.at_level(logging.ERROR, logger="clients.consumers"):
        async with running(consumer) as task:

            async def both_committed() -> bool:
                return sum(o or 0 for o in (await committed(stack.kafka_bootstrap, group, topic)).values()) == 2

            await wait_until(both_committed, 60, what="both offsets committed")
            assert not task.done()  # never a crash
    assert [r["message_id"] for r in await effect_rows(pg, effects)] == [good]
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".inbox') == 1  # never marked processed
    errors = [r.getMessage() for r in caplog.records if "message-id" in r.getMessage()]
    assert errors and "has no 'message-id' header" in errors[0] and f"kafka:{topic}[" in errors[0]


async def test_a_handler_that_keeps_failing_is_given_up_and_the_partition_moves_on(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUMER_TEST_TABLE", effects)
    poison, after = str(uuid.uuid4()), str(uuid.uuid4())
    await produce(stack.kafka_bootstrap, topic, [(poison, "k", b"poison"), (after, "k", b"{}")])
    group = unique_name("g")
    from clients.inbox import AsyncInbox

    inbox = AsyncInbox(group, schema=schema, max_attempts=3)
    consumer = KafkaInboxConsumer(settings(stack, schema), group=group, handler=record, topics=[topic], inbox=inbox)
    async with running(consumer):
        await wait_until(lambda: _count(pg, effects, 1), 60, what="the message after the poison one")
    row = await pg.fetchrow(f'SELECT status, attempts, last_error FROM "{schema}".inbox WHERE message_id = $1', poison)
    assert row["status"] == "failed" and row["attempts"] == 3 and "poison payload" in row["last_error"]
    assert [r["message_id"] for r in await effect_rows(pg, effects)] == [after]


def consume_process(stack: StackEndpoints, schema: str, group: str, topic: str, env: dict[str, str],
                    log: Path, *args: str) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full = {
        **base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OUTBOX_DATABASE_URL": stack.database_url, "OUTBOX_SCHEMA": schema,
        "OUTBOX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "OUTBOX_REDIS_URL": stack.redis_url, **env,
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [RELAY_BIN, "consume", "--group", group, *args],
            env=full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        )


async def test_sigterm_lets_the_handler_in_progress_finish_and_commit(
    stack: StackEndpoints, schema: str, pg: asyncpg.Connection, effects: str, topic: str, tmp_path: Path,
) -> None:
    message_id = str(uuid.uuid4())
    await produce(stack.kafka_bootstrap, topic, [(message_id, "k", b"{}")])
    started, group = tmp_path / "started", unique_name("g")
    env = {"CONSUMER_TEST_TABLE": effects, "CONSUMER_TEST_DELAY": "2", "CONSUMER_TEST_STARTED": str(started)}
    process = consume_process(stack, schema, group, topic, env, tmp_path / "consumer.log",
                              "--kafka", topic, "tests.consumer_handlers:record")
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
    assert sum(o or 0 for o in (await committed(stack.kafka_bootstrap, group, topic)).values()) == 1, log


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(lambda: path.exists() and path.read_text().strip() != "")


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        ("tests.no_such_module:handle", "cannot import handler module 'tests.no_such_module'"),
        ("tests.consumer_handlers:missing", "has no attribute 'missing'"),
        ("tests.consumer_handlers:not_callable", "is a int, not a callable"),
        ("no_colon", "must be module:function"),
    ],
)
def test_a_handler_that_cannot_be_loaded_exits_2_with_one_line(
    stack: StackEndpoints, schema: str, tmp_path: Path, handler: str, expected: str
) -> None:
    process = consume_process(stack, schema, "g", "t", {}, tmp_path / "log", "--kafka", "t", handler)
    assert process.wait(60) == 2
    lines = (tmp_path / "log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_a_schema_without_the_inbox_exits_3(stack: StackEndpoints, tmp_path: Path) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"  # never migrated
    process = consume_process(stack, schema, "g", "t", {}, tmp_path / "log", "--kafka", "t",
                              "tests.consumer_handlers:record")
    assert process.wait(60) == 3, (tmp_path / "log").read_text()
    assert "has no inbox table: run `outbox-relay migrate` first" in (tmp_path / "log").read_text()
