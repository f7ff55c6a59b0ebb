"""Start-up order must not matter: a relay started before its database or its broker waits for
them (serving what it can meanwhile) instead of crash-looping."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from devtools.embedded import EmbeddedStack
from devtools.fleet import (
    Fleet,
    check_delivery,
    pending_count,
    read_kafka,
    read_redis,
    relay_env,
    relay_logs,
    wait_until,
    write_events,
)
from relay import migrate
from tests.conftest import settings_for

pytestmark = pytest.mark.slow


async def test_a_relay_started_before_its_database_waits_for_it(tmp_path: Path) -> None:
    stack = EmbeddedStack(kafka=False)
    try:
        urls = stack.endpoints
        schema = f"s_{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(stack.start_postgres)
        await asyncio.to_thread(migrate.upgrade, settings_for(urls.database_url, schema))
        await asyncio.to_thread(stack.stop_postgres)
        await asyncio.to_thread(stack.start_redis)
        env = relay_env(urls.database_url, schema, "", urls.redis_url, OUTBOX_DEFAULT_SINK="redis")
        fleet = Fleet(urls.database_url, schema, tmp_path, env)
        relay = fleet.spawn("early-bird")
        try:
            await wait_until(
                lambda: asyncio.sleep(0, "database not reachable" in relay.log()), 30, what="a retry logged"
            )
            assert relay.alive(), relay.log()[-2000:]
            await asyncio.to_thread(stack.start_postgres)
            stream = f"orders.{uuid.uuid4().hex[:6]}"
            written = await write_events(urls.database_url, schema, [stream], total=300, keys=30)

            async def drained() -> bool:
                return await pending_count(urls.database_url, schema) == 0

            await wait_until(drained, 60, what="the outbox to drain")
            check_delivery(written, await read_redis(urls.redis_url, stream))
            assert relay.alive()
        finally:
            fleet.stop_all()
    finally:
        await asyncio.to_thread(stack.stop)


async def test_a_relay_started_before_kafka_serves_redis_meanwhile(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    stack = EmbeddedStack(postgres=False)
    try:
        urls = stack.endpoints
        await asyncio.to_thread(stack.start_redis)
        env = relay_env(database_url, schema, urls.kafka_bootstrap, urls.redis_url, OUTBOX_ROUTES="rt.*=redis")
        fleet = Fleet(database_url, schema, tmp_path, env)
        fleet.spawn("no-kafka-yet")
        try:
            stream, topic = f"rt.{uuid.uuid4().hex[:6]}", f"kt.{uuid.uuid4().hex[:6]}"
            to_redis = await write_events(database_url, schema, [stream], total=200, keys=20)
            to_kafka = await write_events(database_url, schema, [topic], total=200, keys=20)

            async def redis_done() -> bool:
                return len(await read_redis(urls.redis_url, stream)) >= 200

            await wait_until(redis_done, 30, what="Redis events while Kafka is down")

            async def redis_settled() -> bool:  # marked done up to OUTBOX_SETTLE_DELAY after the ack
                return await pending_count(database_url, schema) <= 200

            await wait_until(redis_settled, 10, what="the Redis events marked done")
            assert await pending_count(database_url, schema) == 200, "Kafka events cannot have gone anywhere"
            await asyncio.to_thread(stack.start_kafka)

            async def drained() -> bool:
                return await pending_count(database_url, schema) == 0

            try:
                await wait_until(drained, 60, what="Kafka events once Kafka is up")
            except AssertionError:
                raise AssertionError(relay_logs(fleet)) from None
            check_delivery(to_redis, await read_redis(urls.redis_url, stream))
            check_delivery(to_kafka, await read_kafka(urls.kafka_bootstrap, topic))
        finally:
            fleet.stop_all()
    finally:
        await asyncio.to_thread(stack.stop)
