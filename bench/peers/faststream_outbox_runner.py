"""faststream-outbox (PyPI `faststream-outbox[asyncpg]` + `faststream[kafka]`), set up as its README and
docs say: `make_outbox_table(metadata)` created by `metadata.create_all` (what an Alembic autogenerate
migration of it runs), `OutboxBroker(engine, outbox_table=...)` on the asyncpg driver (LISTEN/NOTIFY
wake-ups), `broker.publish(body, queue=..., session=session)` in the writer's SQLAlchemy transaction,
and the relay of docs/usage/relay.md: a `KafkaBroker` publisher decorator stacked on an outbox
subscriber, the app started with the Kafka broker connected on start-up.

Tuned per docs/concepts/performance.md and docs/usage/subscriber.md for a high-throughput idempotent
relay that keeps per-key order: `max_workers=1` (how-it-works.md: "best-effort ordering only ... if you
need strict per-aggregate ordering, route to a single subscriber and run a single worker"),
`fetch_batch_size=100` and `terminal_flush_batch_size=100` (the docs' benchmark setting: "a single
batched worker out-throughputs a four-worker per-row subscriber"), `min_fetch_interval=0.1`,
`max_fetch_interval=1.0` (the docs' example); both brokers at log_level DEBUG (per-message logs filtered out; the other relays run
at WARNING too; FastStream logs every message at INFO by default). The Kafka key rides in a row header (the table has no
key column) and the handler returns a `KafkaResponse` with it and the content-type header."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaResponse
from faststream_outbox import OutboxBroker, make_outbox_table
from faststream_outbox.annotations import OutboxMessage
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from bench.peers.runner import Env, Send, event, main

QUEUE = "bench_outbox"
SUBSCRIBER = {
    "max_workers": 1,
    "fetch_batch_size": 100,
    "terminal_flush_batch_size": 100,
    "min_fetch_interval": 0.1,
    "max_fetch_interval": 1.0,
}


class FastStreamOutbox:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.metadata = MetaData()
        self.table = make_outbox_table(self.metadata, table_name="outbox")

    def engine(self, **options: Any) -> AsyncEngine:
        return create_async_engine(
            self.env.sqlalchemy_url(),
            connect_args={"server_settings": {"search_path": self.env.schema}},
            **options,
        )

    async def setup(self) -> None:
        engine = self.engine()
        try:
            async with engine.begin() as conn:
                await conn.run_sync(self.metadata.create_all)
        finally:
            await engine.dispose()

    async def relay(self, ready: Callable[[], None], stop: asyncio.Event) -> None:
        engine = self.engine()
        # Per-message logs ("Received", "Processed") at DEBUG, below the loggers' level: the other relays log at WARNING.
        broker_outbox = OutboxBroker(engine, outbox_table=self.table, log_level=logging.DEBUG)
        broker_kafka = KafkaBroker(self.env.bootstrap, log_level=logging.DEBUG)
        publisher_kafka = broker_kafka.publisher(self.env.topic)

        @publisher_kafka
        @broker_outbox.subscriber(QUEUE, **SUBSCRIBER)
        async def relay(body: dict[str, Any], msg: OutboxMessage) -> KafkaResponse:
            # The row's own bytes (not `body` re-serialised), its key, the content-type header.
            return KafkaResponse(
                msg.body, key=msg.headers["key"].encode(), headers={"content-type": "application/json"}
            )

        app = FastStream(broker_outbox, on_startup=[broker_kafka.connect])
        await app.start()
        try:
            ready()
            await stop.wait()
        finally:
            await app.stop()
            await broker_kafka.stop()
            await engine.dispose()

    def _broker(self, engine: AsyncEngine) -> OutboxBroker:
        return OutboxBroker(engine, outbox_table=self.table)

    async def backlog(self, count: int, size: int) -> float:
        engine = self.engine()
        broker = self._broker(engine)
        try:
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with sessions() as session, session.begin():
                for n in range(count):
                    key, payload = event(n, size, timed=False)
                    await broker.publish(payload, queue=QUEUE, session=session, headers={"key": key})
            return time.time()  # the commit has returned
        finally:
            await engine.dispose()

    @contextlib.asynccontextmanager
    async def writer(self, tasks: int) -> AsyncIterator[Send]:
        engine = self.engine(pool_size=tasks, max_overflow=0)
        broker = self._broker(engine)
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        async def send(n: int) -> None:
            key, payload = event(n, 200, timed=True)
            async with sessions() as session, session.begin():
                await broker.publish(payload, queue=QUEUE, session=session, headers={"key": key})

        try:
            yield send
        finally:
            await engine.dispose()


if __name__ == "__main__":
    main(FastStreamOutbox)
