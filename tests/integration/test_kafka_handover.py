"""Batching only under load, against the real broker: a lone event is sent at once, whatever the
linger, and events published while a send is outstanding share batches."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.embedded import StackEndpoints
from relay.sinks.kafka import KafkaSink
from tests.integration.test_sinks import make_row, read_topic, sink_settings

PARTITIONS = 4  # read_topic reads this many
LINGER_MS = 3000  # far longer than an acknowledgement takes, even on a loaded machine


@pytest.fixture
async def topic(stack: StackEndpoints) -> AsyncIterator[str]:
    name = f"handover.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


async def connected_sink(stack: StackEndpoints, **overrides: object) -> KafkaSink:
    sink = KafkaSink(sink_settings(stack, **overrides))
    await sink.start()
    deadline = time.monotonic() + 30
    while not sink.is_connected():
        assert time.monotonic() < deadline, f"no connection to the broker: {sink.connect_error}"
        await asyncio.sleep(0.05)
    return sink


def hold_first_produce_answer(
    producer: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds back the broker's answer to the producer's next produce request until the second event
    returned is set; the first is set once that answer has arrived."""
    first_sent, release_first = asyncio.Event(), asyncio.Event()
    client_send = producer.client.send

    async def holding_send(node_id: int, request: Any, **kwargs: Any) -> Any:
        response = await client_send(node_id, request, **kwargs)
        if request.API_KEY == 0 and not first_sent.is_set():  # the first produce request
            first_sent.set()
            await release_first.wait()
        return response

    monkeypatch.setattr(producer.client, "send", holding_send)
    return first_sent, release_first


async def test_a_lone_event_does_not_wait_for_the_linger(stack: StackEndpoints, topic: str) -> None:
    sink = await connected_sink(stack, kafka_linger_ms=LINGER_MS)
    try:
        # The first publish also fetches the topic's metadata: not what is measured here.
        assert all(r.ok for r in await sink.publish([make_row(topic, "warm", b"warm-up")]))
        took = []
        for n in range(5):
            started = time.monotonic()
            results = await sink.publish([make_row(topic, f"k{n}", f"lone {n}".encode(), n)])
            took.append(time.monotonic() - started)
            assert [r.ok for r in results] == [True]
        # Each event was alone with nothing in flight: sent at once, not after the linger.
        assert max(took) < LINGER_MS / 1000 / 2, took
        records = await read_topic(stack.kafka_bootstrap, topic, 6)
        assert sum(len(r) for r in records.values()) == 6
    finally:
        await sink.stop()


async def test_events_published_while_a_send_is_outstanding_share_batches(
    stack: StackEndpoints, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await connected_sink(stack)  # the default: no linger
    try:
        assert all(r.ok for r in await sink.publish([make_row(topic, "warm", b"warm-up")]))
        _, partition = sink.destination(make_row(topic, "same-key", b""))
        assert sink._lanes is not None and partition is not None
        producer = sink._lanes.producer_for(partition)  # the one that carries the key's partition
        handed: list[int] = []
        send_batch = producer.send_batch

        async def counting_send_batch(builder, topic_name, *, partition):  # type: ignore[no-untyped-def]
            handed.append(partition)
            return await send_batch(builder, topic_name, partition=partition)

        monkeypatch.setattr(producer, "send_batch", counting_send_batch)
        # The broker's answer to the first request is held back, so the first event's send stays
        # outstanding, however fast the broker, until all the others were published.
        first_sent, release_first = hold_first_produce_answer(producer, monkeypatch)
        # One event of a key goes at once; while it is outstanding, 39 more of the same key (one
        # Kafka partition) are published one after another by other workers: they gather behind it.
        rows = [make_row(topic, "same-key", f"{n}".encode(), n) for n in range(40)]
        first = asyncio.create_task(sink.publish(rows[:1]))
        await asyncio.wait_for(first_sent.wait(), 30)
        later = []
        for row in rows[1:]:
            later.append(asyncio.create_task(sink.publish([row])))
            await asyncio.sleep(0)
        release_first.set()
        results = [await first, *[await task for task in later]]
        assert all(r.ok for rs in results for r in rs)
        assert len(handed) == 2 and len(set(handed)) == 1, handed  # the lone one, then one for all 39
        records = await read_topic(stack.kafka_bootstrap, topic, 41)
        values = [v for recs in records.values() for k, v, _ in recs if k == b"same-key"]
        assert values == [f"{n}".encode() for n in range(40)]
    finally:
        await sink.stop()


def key_on_partition(sink: KafkaSink, topic: str, partition: int) -> str:
    for n in range(1000):
        if sink.destination(make_row(topic, f"k{n}", b""))[1] == partition:
            return f"k{n}"
    raise AssertionError(f"no key for partition {partition}")


async def test_a_request_in_flight_on_one_connection_holds_back_no_other_partition(
    stack: StackEndpoints, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two producers, partitions 0 and 1 travel on different connections: while the broker's
    answer for partition 0 is held back, an event of partition 1 is still delivered (behind one
    connection it would wait for that answer), and partition 0's events keep their order."""
    sink = await connected_sink(stack, kafka_connections=2)
    release_first = asyncio.Event()
    try:
        assert all(r.ok for r in await sink.publish([make_row(topic, "warm", b"warm-up")]))
        assert sink._lanes is not None
        held = sink._lanes.producer_for(0)
        assert sink._lanes.producer_for(1) is not held
        first_sent, release_first = hold_first_produce_answer(held, monkeypatch)
        key0, key1 = key_on_partition(sink, topic, 0), key_on_partition(sink, topic, 1)
        first = asyncio.create_task(sink.publish([make_row(topic, key0, b"first", 1)]))
        await asyncio.wait_for(first_sent.wait(), 30)
        behind = asyncio.create_task(sink.publish([make_row(topic, key0, b"second", 2)]))
        beside = await asyncio.wait_for(sink.publish([make_row(topic, key1, b"beside", 3)]), 30)
        assert [r.ok for r in beside] == [True]
        assert not first.done() and not behind.done()
        release_first.set()
        assert all(r.ok for rs in (await first, await behind) for r in rs)
        records = await read_topic(stack.kafka_bootstrap, topic, 4)
        assert [v for k, v, _ in records[0] if k == key0.encode()] == [b"first", b"second"]
    finally:
        release_first.set()  # a failed assertion must not leave the producer's flush waiting on it
        await sink.stop()
