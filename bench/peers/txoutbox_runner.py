"""txoutbox (PyPI `txoutbox[postgres]`), set up as its README says: `PostgresStorage` on an asyncpg
pool with `notify_channel` (the schema's AFTER INSERT trigger) and `storage.listen(relay.wake)`,
`schema_sql()` as the migration, `storage.insert(conn, ...)` in the writer's transaction, and the
README's "Kafka in three lines" publisher (aiokafka `send_and_wait` per message, key = the row's key).
RelayConfig at its defaults (batch_size 50, concurrency 10, strict per-key ordering on)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
from aiokafka import AIOKafkaProducer
from txoutbox import OutboxMessage, Relay
from txoutbox.adapters.postgres import PostgresStorage

from bench.peers.runner import Env, Send, event, main

CHANNEL = "txoutbox_bench"
HEADERS = {"content-type": "application/json"}


class TxOutbox:
    def __init__(self, env: Env) -> None:
        self.env = env

    def storage(self, pool: asyncpg.Pool) -> PostgresStorage:
        return PostgresStorage(pool, schema=self.env.schema, notify_channel=CHANNEL)

    async def setup(self) -> None:
        pool = await asyncpg.create_pool(self.env.dsn, min_size=1, max_size=1)
        try:
            await self.storage(pool).create_schema()
        finally:
            await pool.close()

    async def relay(self, ready: Callable[[], None], stop: asyncio.Event) -> None:
        pool = await asyncpg.create_pool(self.env.dsn)
        producer = AIOKafkaProducer(bootstrap_servers=self.env.bootstrap)
        await producer.start()
        try:
            outbox = self.storage(pool)

            async def publish(message: OutboxMessage) -> None:
                await producer.send_and_wait(
                    message.topic, message.payload, key=message.key.encode() if message.key else None
                )

            relay = Relay(outbox, publish)
            listener = await outbox.listen(relay.wake)
            running = asyncio.create_task(relay.run())
            ready()
            await stop.wait()
            relay.stop()
            await running
            await listener.close()
        finally:
            await producer.stop()
            await pool.close()

    async def backlog(self, count: int, size: int) -> float:
        pool = await asyncpg.create_pool(self.env.dsn, min_size=1, max_size=1)
        try:
            outbox = self.storage(pool)
            async with pool.acquire() as conn, conn.transaction():
                for n in range(count):
                    key, payload = event(n, size, timed=False)
                    await outbox.insert(conn, self.env.topic, payload, key=key, headers=HEADERS)
            return time.time()  # the commit has returned
        finally:
            await pool.close()

    @contextlib.asynccontextmanager
    async def writer(self, tasks: int) -> AsyncIterator[Send]:
        pool = await asyncpg.create_pool(self.env.dsn, min_size=tasks, max_size=tasks)
        outbox = self.storage(pool)

        async def send(n: int) -> None:
            key, payload = event(n, 200, timed=True)
            async with pool.acquire() as conn, conn.transaction():
                await outbox.insert(conn, self.env.topic, payload, key=key, headers=HEADERS)

        try:
            yield send
        finally:
            await pool.close()


if __name__ == "__main__":
    main(TxOutbox)
