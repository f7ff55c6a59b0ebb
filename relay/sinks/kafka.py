"""Kafka sink (aiokafka): key = row key, value = payload, headers = row headers + message-id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaTimeoutError,
    SaslAuthenticationFailed,
    UnknownTopicOrPartitionError,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from relay.budget import row_bytes
from relay.config import RelaySettings
from relay.events import DEFERRED, PUBLISHED, OutboxRow, Outcome, PublishResult
from relay.faults import Fault, classify_kafka_error, kafka_error_is_topic_scoped
from relay.retry import FailureBackoff
from relay.sinks.base import (
    MESSAGE_ID_HEADER,
    ConnectFailure,
    ConnectState,
    SinkUnavailableError,
    is_tls_error,
)
from relay.sinks.kafka_batches import KeyPartitioner, OpenBatch, PredecessorFailed, SharedBatches
from relay.sinks.kafka_lanes import ProducerLanes

log = logging.getLogger(__name__)

# More than a record's own framing (lengths, varints, per-header overhead) on top of its data bytes.
_RECORD_FRAMING_MARGIN = 4096
Layout = tuple[list[int], list[int]]  # all partitions of a topic (sorted), those with a leader


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
        self._lanes: ProducerLanes | None = None
        self._partitioner = KeyPartitioner()
        self._unknown_since: dict[str, float] = {}
        self._reachable = False
        self._connecting: asyncio.Task[None] | None = None
        self.connect_error: str | None = None  # why the last connection attempt failed
        self.connection = ConnectState("kafka", log)

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
        """Retries until connected. A failure that is not the network (authentication, TLS, an
        unsupported broker, a wrong setting) is logged as an error each time, counted and shown on
        /readyz (self.connection), so it does not hide as "not connected yet"."""
        backoff = FailureBackoff(0.2, self._settings.sink_backoff_max)
        settings = self._settings
        while True:
            try:  # a failure leaves nothing open (ProducerLanes.start stops what it started)
                lanes = await ProducerLanes.start(
                    settings.kafka_connections,
                    lambda: AIOKafkaProducer(**self._producer_options()),
                    settings.kafka_linger_ms,
                )
            except Exception as exc:
                cause: BaseException = exc
                if isinstance(exc, KafkaConnectionError):
                    cause = await self._bootstrap_error(exc)
                delay = backoff.failed()
                self.connect_error = _detail(cause)
                self.connection.failed(kafka_connect_failure(cause), self.connect_error, delay)
                await asyncio.sleep(delay)
                continue
            self._lanes = lanes
            self._reachable = True
            self.connect_error = None
            self.connection.connected()
            log.info("connected to kafka")
            return

    async def _bootstrap_error(self, exc: KafkaConnectionError) -> BaseException:
        """aiokafka's bootstrap says only "Unable to bootstrap" whatever each broker did (refused
        the SASL credentials, failed the TLS handshake...): asks the brokers once more, all at once,
        for the real reason. `exc` itself when every one of them is just unreachable."""
        options = self._producer_options()

        async def ask(host: str, port: int) -> BaseException | None:
            try:
                conn = await asyncio.wait_for(
                    create_conn(
                        host,
                        port,
                        client_id=options["client_id"],
                        request_timeout_ms=options["request_timeout_ms"],
                        ssl_context=options.get("ssl_context"),
                        security_protocol=options["security_protocol"],
                        sasl_mechanism=options.get("sasl_mechanism"),
                        sasl_plain_username=options.get("sasl_plain_username"),
                        sasl_plain_password=options.get("sasl_plain_password"),
                    ),
                    timeout=5,
                )
            except Exception as found:  # the reason we are after
                return found
            conn.close()
            return None

        hosts = collect_hosts(self._settings.kafka_bootstrap or "")
        answers = await asyncio.gather(*(ask(host, port) for host, port, _family in hosts))
        return next(
            (a for a in answers if a is not None and kafka_connect_failure(a) is not ConnectFailure.NETWORK), exc
        )

    async def stop(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        lanes, self._lanes = self._lanes, None
        if lanes is not None:
            await lanes.stop()

    @property
    def _producer(self) -> AIOKafkaProducer | None:
        """The lanes' primary producer (metadata, probes, dead letters), once connected."""
        return None if self._lanes is None else self._lanes.primary

    def is_connected(self) -> bool:
        """False from the first sign of an outage until the broker acknowledges again."""
        return self._producer is not None and self._reachable

    def destination(self, row: OutboxRow) -> tuple[str, int | None]:
        """The topic and, for a keyed event once the topic's metadata is known, its partition (the
        same murmur2 choice publish makes; a keyless event's partition is chosen at random)."""
        producer = self._producer
        if producer is None or row.key is None:
            return row.topic, None
        partitions = producer.client.cluster.partitions_for_topic(row.topic)
        if not partitions:
            return row.topic, None
        return row.topic, self._partitioner.partition(row.key.encode(), sorted(partitions), ())

    async def probe(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            answered = bool(await asyncio.wait_for(producer.client.force_metadata_update(), timeout=10))
        except Exception:
            return False
        self._reachable = self._reachable or answered
        return answered

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        lanes = self._lanes
        if lanes is None:
            raise SinkUnavailableError("not connected to kafka yet")
        results: list[PublishResult | None] = [None] * len(rows)
        layouts = await self._layouts(lanes, {row.topic for row in rows})
        carried: list[tuple[int, OpenBatch]] = []
        for index, row in enumerate(rows):
            layout = layouts[row.topic]
            if not isinstance(layout, tuple):
                results[index] = layout
                continue
            key = None if row.key is None else row.key.encode()
            headers = kafka_headers(row)
            if row_bytes(row) + _RECORD_FRAMING_MARGIN > self._settings.kafka_max_request_size:
                too_large = self._size_error(key, row.payload, headers)  # measured only when it may be
                if too_large is not None:
                    results[index] = PublishResult(Outcome.REJECT, "record_too_large", too_large)
                    continue
            partition = self._partitioner.partition(key, *layout)
            batches = lanes.batches_for(partition)
            carried.append((index, batches.append(row.topic, partition, key, row.payload, headers)))
        if carried:
            await asyncio.wait({batch.delivery for _, batch in carried})
        # In row order, so that once an event of a key fails, its later events are only deferred.
        failed_keys: set[tuple[str, str] | None] = set()
        for index, batch in carried:
            row = rows[index]
            if row.ordering_key is not None and row.ordering_key in failed_keys:
                result = DEFERRED if not batch_ok(batch) else PUBLISHED
            else:
                result = await self._outcome(lanes.batches_for(batch.partition), row, batch)
            if result.outcome not in (Outcome.PUBLISHED, Outcome.REJECT):
                failed_keys.add(row.ordering_key)
            results[index] = result
        final = [result or PUBLISHED for result in results]
        if any(r.ok for r in final):
            self._reachable = True
        elif any(r.outcome is Outcome.UNAVAILABLE and not r.topic_scoped for r in final):
            self._reachable = False
        return final

    async def _layouts(self, lanes: ProducerLanes, topics: set[str]) -> dict[str, Layout | PublishResult]:
        """Per topic: its partitions, or why the topic cannot be published to now."""
        layouts: dict[str, Layout | PublishResult] = {}
        cluster = lanes.primary.client.cluster
        for topic in topics:
            asked_at_ms = time.time() * 1000
            try:
                partitions = sorted(await lanes.primary.partitions_for(topic))
                known = await lanes.know_partitions(topic, partitions)
            except Exception as exc:  # classified per topic
                layouts[topic] = self._metadata_failure(topic, exc, asked_at_ms)
                continue
            if not known:
                layouts[topic] = PublishResult(
                    Outcome.UNAVAILABLE,
                    "broker_unavailable",
                    "new partitions of the topic are not yet in every producer's metadata",
                    topic_scoped=True,
                )
                continue
            available = cluster.available_partitions_for_topic(topic) or ()
            layouts[topic] = (partitions, list(available))
        return layouts

    def _metadata_failure(self, topic: str, exc: BaseException, asked_at_ms: float) -> PublishResult:
        """aiokafka says "unknown topic" whenever metadata for it did not arrive in time, also when
        the broker never answered. Only a broker that answered without the topic means it is
        missing, and only that counts toward OUTBOX_UNKNOWN_TOPIC_GRACE."""
        if isinstance(exc, (UnknownTopicOrPartitionError, KafkaTimeoutError)):
            producer = self._producer
            cluster = producer.client.cluster if producer is not None else None
            answered = cluster is not None and cluster._last_successful_refresh_ms >= asked_at_ms
            if answered and topic not in cluster.topics():  # type: ignore[union-attr]
                return self._unknown_topic(topic, exc)
            return PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", _detail(exc))
        return self._classify(topic, exc)

    def _unknown_topic(self, topic: str, exc: BaseException) -> PublishResult:
        first = self._unknown_since.setdefault(topic, time.monotonic())
        if time.monotonic() - first >= self._settings.unknown_topic_grace:
            return PublishResult(Outcome.REJECT, "unknown_topic", _detail(exc))
        return PublishResult(Outcome.UNAVAILABLE, "unknown_topic", _detail(exc), topic_scoped=True)

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
        if isinstance(exc, PredecessorFailed):
            return DEFERRED
        result = self._classify(row.topic, exc)
        if result.outcome in (Outcome.REJECT, Outcome.RETRY) and batch.records > 1:
            # The broker refused a shared batch for the sake of one record (its size, its content):
            # find out which, alone, so the others are charged nothing.
            key = None if row.key is None else row.key.encode()
            alone = batches.alone(row.topic, batch.partition, key, row.payload, kafka_headers(row))
            await asyncio.wait({alone.delivery})
            return await self._outcome(batches, row, alone)
        return result

    def _classify(self, topic: str, exc: BaseException) -> PublishResult:
        if isinstance(exc, UnknownTopicOrPartitionError):
            # From a produce answer: the broker itself does not know the topic (or not yet, while it
            # restarts): an outage of this topic; the grace counts only confirmed absence.
            producer = self._producer
            if producer is not None and topic not in producer.client.cluster.topics():
                return self._unknown_topic(topic, exc)
            return PublishResult(Outcome.UNAVAILABLE, "unknown_topic", _detail(exc), topic_scoped=True)
        fault, reason = classify_kafka_error(exc)
        if fault is Fault.SINK_UNAVAILABLE:
            scoped = kafka_error_is_topic_scoped(exc)
            return PublishResult(Outcome.UNAVAILABLE, reason, _detail(exc), topic_scoped=scoped)
        if reason == "publish_failed":
            return PublishResult(Outcome.RETRY, reason, _detail(exc))
        return PublishResult(Outcome.REJECT, reason, _detail(exc))

    async def publish_dead_letters(self, letters: Sequence[tuple[OutboxRow, str]]) -> None:
        producer = self._producer
        if producer is None:
            raise SinkUnavailableError("not connected to kafka")
        sent = [
            await producer.send(
                f"{row.topic}.dlq",
                value=row.payload,
                key=None if row.key is None else row.key.encode(),
                headers=[*kafka_headers(row), ("dead-letter-reason", reason.encode())],
            )
            for row, reason in letters
        ]
        await asyncio.gather(*sent)


def kafka_connect_failure(exc: BaseException) -> ConnectFailure:
    """The kind of a failed connection to Kafka (see relay.sinks.base.ConnectFailure)."""
    if is_tls_error(exc):
        return ConnectFailure.TLS
    if isinstance(exc, AuthenticationFailedError | SaslAuthenticationFailed | IllegalSaslStateError):
        return ConnectFailure.AUTHENTICATION
    if isinstance(exc, UnsupportedSaslMechanismError | AuthenticationMethodNotSupported | UnsupportedVersionError):
        return ConnectFailure.UNSUPPORTED
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | OSError | TimeoutError):
        return ConnectFailure.NETWORK
    return ConnectFailure.OTHER


def batch_ok(batch: OpenBatch) -> bool:
    delivery = batch.delivery
    return delivery.done() and not delivery.cancelled() and delivery.exception() is None


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
