"""omni-box (PyPI `omni-box[postgres,kafka]`, Python 3.12+), set up as its README and docs say: the
service's own `DeclarativeBase` with `OutboxEventDB(Base, OutboxEventDBBase)` (docs/migrations.md),
created by `metadata.create_all`; `OmniBoxDomainService().create_outbox_event(...)` written by
`PostgresOutboxRepository(session, model_class=OutboxEventDB).create(event)` in the writer's own
transaction; the README's publisher loop: a transaction per cycle, `OutboxPublisher(repo,
KafkaEventPublisher(producer, converter)).publish_batch(worker_id=..., batch_size=100)`, sleeping 1 s
when a cycle published nothing. `RawEventConverter` sends the payload itself (the README's example uses
an envelope; the consumer here reads the bench's own payload). The payload is JSONB, so the bytes on
the topic are the same JSON re-serialised by orjson. The producer is set as KafkaEventPublisher's
docstring asks (acks="all") except idempotence, which the embedded Tansu broker does not support."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from omni_box import OmniBoxDomainService, OutboxPublisher
from omni_box.core.converters import RawEventConverter
from omni_box.infra.brokers.kafka import KafkaEventPublisher
from omni_box.infra.storage.postgres import OutboxEventDBBase, PostgresOutboxRepository
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from bench.peers.runner import Env, Send, event, main

BATCH_SIZE = 100
IDLE_SLEEP = 1.0
HEADERS = {"content-type": "application/json"}


# structlog's default configuration prints every level (a debug line per event written and published);
# the service configures it (the docs: "apply your own renderer/processors"): WARNING, like the others.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


class Base(DeclarativeBase):
    """The service-owned declarative base."""


class OutboxEventDB(Base, OutboxEventDBBase):
    """The concrete outbox table."""


class OmniBox:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.domain = OmniBoxDomainService()

    def engine(self, **options: Any) -> AsyncEngine:
        return create_async_engine(
            self.env.sqlalchemy_url(),
            connect_args={"server_settings": {"search_path": self.env.schema}},
            **options,
        )

    def outbox_event(self, n: int, size: int, timed: bool) -> Any:
        key, payload = event(n, size, timed)
        return self.domain.create_outbox_event(
            aggregate_type="bench",
            aggregate_id=uuid.UUID(int=n % 1000 + 1),
            event_type="bench.event",
            topic=self.env.topic,
            partition_key=key,
            payload=json.loads(payload),
            headers=HEADERS,
        )

    async def setup(self) -> None:
        engine = self.engine()
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
        finally:
            await engine.dispose()

    async def relay(self, ready: Callable[[], None], stop: asyncio.Event) -> None:
        engine = self.engine()
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.env.bootstrap, acks="all", enable_idempotence=False
        )
        await producer.start()
        try:
            broker = KafkaEventPublisher(producer=producer, converter=RawEventConverter())
            ready()
            while not stop.is_set():
                async with sessions() as session, session.begin():
                    repo = PostgresOutboxRepository(session, model_class=OutboxEventDB)
                    result = await OutboxPublisher(repo, broker).publish_batch(
                        worker_id="publisher-1", batch_size=BATCH_SIZE
                    )
                if not result.processed_event_ids:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), IDLE_SLEEP)
        finally:
            await producer.stop()
            await engine.dispose()

    async def backlog(self, count: int, size: int) -> float:
        engine = self.engine()
        try:
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with sessions() as session, session.begin():
                repo = PostgresOutboxRepository(session, model_class=OutboxEventDB)
                for n in range(count):
                    await repo.create(self.outbox_event(n, size, timed=False))
            return time.time()  # the commit has returned
        finally:
            await engine.dispose()

    @contextlib.asynccontextmanager
    async def writer(self, tasks: int) -> AsyncIterator[Send]:
        engine = self.engine(pool_size=tasks, max_overflow=0)
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        async def send(n: int) -> None:
            outbox_event = self.outbox_event(n, 200, timed=True)
            async with sessions() as session, session.begin():
                await PostgresOutboxRepository(session, model_class=OutboxEventDB).create(outbox_event)

        try:
            yield send
        finally:
            await engine.dispose()


if __name__ == "__main__":
    main(OmniBox)
