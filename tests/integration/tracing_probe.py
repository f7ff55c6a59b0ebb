"""Run as a script by test_tracing.py, in its own process because it installs a global
TracerProvider. Prints one JSON object: the spans recorded and the headers the consumer saw."""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
from aiokafka import AIOKafkaConsumer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from clients import aenqueue
from relay.config import RelaySettings
from relay.service import RelayService


async def main(database_url: str, schema: str, kafka: str, redis_url: str, topic: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    settings = RelaySettings(
        database_url=SecretStr(database_url),
        schema_name=schema,
        kafka_bootstrap=kafka,
        redis_url=SecretStr(redis_url),
        routes=f"{topic}.stream=redis",
        lease_ttl=3,
    )
    service = RelayService(settings)
    await service.start()
    conn = await asyncpg.connect(database_url)
    with trace.get_tracer("app").start_as_current_span("place order") as writer_span:
        async with conn.transaction():
            await aenqueue(conn, topic, {"order": 1}, key="order-1", schema=schema)
            await aenqueue(conn, f"{topic}.stream", {"order": 1}, key="order-1", schema=schema)
    writer = writer_span.get_span_context()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka, auto_offset_reset="earliest", fetch_max_wait_ms=20
    )
    await consumer.start()
    record = await asyncio.wait_for(consumer.getone(), 30)
    await consumer.stop()
    # Both events' spans end once settled: wait for them (the Redis one may trail the Kafka one).
    for _ in range(600):
        if sum(s.name.startswith("send ") for s in exporter.get_finished_spans()) >= 2:
            break
        await asyncio.sleep(0.05)
    await service.stop()
    await conn.close()
    spans = [
        {
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent": format(s.parent.span_id, "016x") if s.parent else None,
            "links": [
                format(link.context.trace_id, "032x") + "-" + format(link.context.span_id, "016x")
                for link in s.links
            ],
            "kind": s.kind.name,
            "attributes": dict(s.attributes or {}),
        }
        for s in exporter.get_finished_spans()
    ]
    print(
        json.dumps(
            {
                "writer": format(writer.trace_id, "032x") + "-" + format(writer.span_id, "016x"),
                "spans": spans,
                "headers": {k: v.decode() for k, v in record.headers},
                "partition": record.partition,
                "message_id": dict(record.headers)["message-id"].decode(),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
