"""Kafka sink (aiokafka): key = row key, value = payload, headers = row headers + message-id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    RecordListTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from relay.config import RelaySettings
from relay.events import PUBLISHED, OutboxRow, Outcome, PublishResult
from relay.sinks.base import MESSAGE_ID_HEADER, SinkUnavailableError
from relay.sinks.kafka_batches import KeyPartitioner, OpenBatch, SharedBatches

log = logging.getLogger(__name__)

_OUTAGE = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    NotLeaderForPartitionError,
    NotEnoughReplicasError,
)
_REJECTED = {
    MessageSizeTooLargeError: "record_too_large",
    RecordListTooLargeError: "record_too_large",
    InvalidTopicError: "invalid_topic",
    TopicAuthorizationFailedError: "topic_not_authorized",
}
_SIZE_REFUSALS = (MessageSizeTooLargeError, RecordListTooLargeError)


def kafka_headers(row: OutboxRow) -> list[tuple[str, bytes]]:
    headers = [(name, value.encode()) for name, value in row.headers.items() if name != MESSAGE_ID_HEADER]
    headers.append((MESSAGE_ID_HEADER, str(row.message_id).encode()))
    return headers


class KafkaSink:
    name = "kafka"

    def __init__(self, settings: RelaySettings) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("OUTBOX_KAFKA_BOOTSTRAP is required when a topic routes to Kafka")
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._batches: SharedBatches | None = None
        self._partitioner = KeyPartitioner()
        self._unknown_since: dict[str, float] = {}
        self._reachable = False
        self._connecting: asyncio.Task[None] | None = None

    def _producer_options(self) -> dict[str, Any]:
        s = self._settings
        options: dict[str, Any] = {
            "bootstrap_servers": s.kafka_bootstrap,
            "client_id": f"outbox-relay-{s.instance_id}",
            "acks": "all" if s.kafka_acks == "all" else int(s.kafka_acks),
            "compression_type": s.kafka_compression,
            "linger_ms": s.kafka_linger_ms,
            "max_request_size": s.kafka_max_request_size,
            "max_batch_size": min(s.kafka_max_request_size, 1_048_576),
            "enable_idempotence": s.kafka_idempotence,
            "request_timeout_ms": int(min(s.publish_timeout, 30.0) * 1000),
            "security_protocol": s.kafka_security_protocol,
        }
        if s.kafka_sasl_mechanism:
            options["sasl_mechanism"] = s.kafka_sasl_mechanism
            options["sasl_plain_username"] = s.kafka_sasl_username
            if s.kafka_sasl_password is not None:
                options["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value()
        if "SSL" in s.kafka_security_protocol:
            options["ssl_context"] = create_ssl_context(
                cafile=s.kafka_ssl_cafile, certfile=s.kafka_ssl_certfile, keyfile=s.kafka_ssl_keyfile
            )
        return options

    async def start(self) -> None:
        """Returns at once; connecting goes on in the background, so a relay started while its
        broker is down still serves its other sink and the control plane (publish reports the
        broker unavailable meanwhile)."""
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect(), name="kafka-connect")

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(**self._producer_options())
            try:
                await producer.start()
            except KafkaConnectionError as exc:
                await producer.stop()
                log.warning("kafka not reachable yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.sink_backoff_max)
                continue
            self._producer = producer
            self._batches = SharedBatches(producer)
            self._reachable = True
            log.info("connected to kafka")
            return

    async def stop(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        producer, self._producer, self._batches = self._producer, None, None
        if producer is not None:
            await producer.stop()

    def is_connected(self) -> bool:
        """False from the first sign of an outage until the broker acknowledges again."""
        return self._producer is not None and self._reachable

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        producer, batches = self._producer, self._batches
        if producer is None or batches is None:
            raise SinkUnavailableError("not connected to kafka yet")
        results: list[PublishResult | None] = [None] * len(rows)
        layouts = await self._layouts(producer, {row.topic for row in rows})
        carried: list[tuple[int, OpenBatch]] = []
        for index, row in enumerate(rows):
            layout = layouts[row.topic]
            if isinstance(layout, BaseException):
                results[index] = self._classify(row, layout)
                continue
            key = None if row.key is None else row.key.encode()
            headers = kafka_headers(row)
            too_large = self._size_error(key, row.payload, headers)
            if too_large is not None:
                results[index] = PublishResult(Outcome.REJECT, "record_too_large", too_large)
                continue
            partition = self._partitioner.partition(key, *layout)
            carried.append((index, batches.append(row.topic, partition, key, row.payload, headers)))
        if carried:
            await asyncio.wait({batch.delivery for _, batch in carried})
        for index, batch in carried:
            results[index] = await self._outcome(batches, rows[index], batch)
        final = [result or PUBLISHED for result in results]
        if any(r.ok for r in final):
            self._reachable = True
        elif any(r.reason == "broker_unavailable" for r in final):
            self._reachable = False
        return final

    async def _layouts(
        self, producer: AIOKafkaProducer, topics: set[str]
    ) -> dict[str, tuple[list[int], list[int]] | BaseException]:
        """Per topic: (all partitions sorted, those with a leader), or why they are not known."""
        layouts: dict[str, tuple[list[int], list[int]] | BaseException] = {}
        cluster = producer.client.cluster
        for topic in topics:
            try:
                partitions = await producer.partitions_for(topic)
            except Exception as exc:  # classified per event
                layouts[topic] = exc
                continue
            available = cluster.available_partitions_for_topic(topic) or ()
            layouts[topic] = (sorted(partitions), list(available))
        return layouts

    def _size_error(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> str | None:
        limit = self._settings.kafka_max_request_size
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size <= limit:
            return None
        return f"MessageSizeTooLargeError: the record is {size} bytes, over OUTBOX_KAFKA_MAX_REQUEST_SIZE={limit}"

    async def _outcome(self, batches: SharedBatches, row: OutboxRow, batch: OpenBatch) -> PublishResult:
        if batch.delivery.cancelled():  # the producer was stopped under it
            return PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", "the Kafka producer was stopped")
        exc = batch.delivery.exception()
        if exc is None:
            self._unknown_since.pop(row.topic, None)
            return PUBLISHED
        if isinstance(exc, _SIZE_REFUSALS) and batch.records > 1:
            # The broker refused the whole batch for one record's sake: find out which, alone.
            key = None if row.key is None else row.key.encode()
            alone = batches.alone(row.topic, batch.partition, key, row.payload, kafka_headers(row))
            await asyncio.wait({alone.delivery})
            return await self._outcome(batches, row, alone)
        return self._classify(row, exc)

    def _classify(self, row: OutboxRow, exc: BaseException) -> PublishResult:
        detail = f"{type(exc).__name__}: {exc}"
        for kind, reason in _REJECTED.items():
            if isinstance(exc, kind):
                return PublishResult(Outcome.REJECT, reason, detail)
        if isinstance(exc, UnknownTopicOrPartitionError) or self._looks_like_unknown_topic(row.topic, exc):
            first = self._unknown_since.setdefault(row.topic, time.monotonic())
            if time.monotonic() - first >= self._settings.unknown_topic_grace:
                return PublishResult(Outcome.REJECT, "unknown_topic", detail)
            return PublishResult(Outcome.UNAVAILABLE, "unknown_topic", detail)
        if isinstance(exc, _OUTAGE):
            return PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", detail)
        if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
            return PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", detail)
        return PublishResult(Outcome.RETRY, "publish_failed", detail)

    def _looks_like_unknown_topic(self, topic: str, exc: BaseException) -> bool:
        """A metadata timeout while brokers answer means the topic itself is missing."""
        producer = self._producer
        return (
            isinstance(exc, KafkaTimeoutError)
            and producer is not None
            and bool(producer.client.cluster.brokers())
            and topic not in producer.client.cluster.topics()
            and not producer.client.cluster.unauthorized_topics
        )

    async def publish_dead_letter(self, row: OutboxRow, reason: str) -> None:
        producer = self._producer
        if producer is None:
            return
        headers = [*kafka_headers(row), ("dead-letter-reason", reason.encode())]
        await producer.send_and_wait(
            f"{row.topic}.dlq",
            value=row.payload,
            key=None if row.key is None else row.key.encode(),
            headers=headers,
        )
