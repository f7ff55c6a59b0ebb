"""The Kafka consumer: a consumer group (aiokafka) whose messages go through the inbox.

Each assigned partition has one worker that handles its records one at a time, in offset order
(per-key order: a key always maps to one partition); partitions are handled concurrently, at most
OUTBOX_CONSUMER_CONCURRENCY messages at once. A partition is paused while its fetched batch is being
handled, so the consumer never holds more than one batch per partition. The offset after a record
is committed only once the inbox settled it (the handler's transaction, with the processed mark,
committed; or a duplicate; or given up): a crash at any point redelivers, the inbox skips what was
processed. On a rebalance the revoked partitions' workers finish the record in progress and commit
before the partitions are given away; on stop the same, then the consumer leaves the group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from clients.consumers.messages import InvalidMessageError, kafka_message
from clients.consumers.metrics import ConsumerMetrics
from clients.consumers.processing import Processor, RetryDelay, wait_or_abandon
from clients.consumers.settings import ConsumerSettings
from clients.consumers.tracing import span_attributes
from clients.inbox import AsyncInbox, InboxOutcome, InboxValidationError

log = logging.getLogger("clients.consumers.kafka")


class _PartitionWorker:
    """Handles one partition's batches in order; `abandon` makes it stop after the record in progress."""

    def __init__(self, owner: KafkaInboxConsumer, tp: TopicPartition) -> None:
        self.owner = owner
        self.tp = tp
        self.abandon = asyncio.Event()
        self.batches: asyncio.Queue[list[ConsumerRecord[bytes, bytes]]] = asyncio.Queue()
        self.committed: int | None = None  # the offset committed last
        self.done: int | None = None  # the offset after the last settled record
        self.task = asyncio.create_task(self._run(), name=f"kafka-{tp.topic}-{tp.partition}")

    async def _run(self) -> None:
        while not self.abandon.is_set():
            getter = asyncio.ensure_future(self.batches.get())
            stopper = asyncio.ensure_future(self.abandon.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            records = getter.result()
            next_offset = records[0].offset
            try:
                for record in records:
                    if self.abandon.is_set():
                        break
                    if not await self.owner._handle(self.tp, record, self.abandon):
                        break
                    next_offset = self.done = record.offset + 1
                await self.commit()
            except Exception:  # never die silently: log, and fetch the rest of the batch again
                log.exception("partition %s[%d] worker failed at offset %d; fetching from there again",
                              self.tp.topic, self.tp.partition, next_offset)
                await wait_or_abandon(self.abandon, 1.0)
            finally:
                if not self.abandon.is_set():
                    if next_offset <= records[-1].offset:
                        self.owner._seek(self.tp, next_offset)
                    self.owner._resume(self.tp)

    async def commit(self) -> bool:
        """Commits the offset after the last settled record (no-op if already committed)."""
        if self.done is None or self.done == self.committed:
            return True
        if await self.owner._commit(self.tp, self.done):
            self.committed = self.done
            return True
        return False


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaInboxConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.owner._release(list(revoked), reason="revoked")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))


class KafkaInboxConsumer:
    """Consumes `topics` (or the topics matching the regex `pattern`) in consumer group `group` through
    `AsyncInbox(group)`: run() until request_stop(). `handler(conn, message)` runs in the inbox's
    transaction (see clients.inbox)."""

    system = "kafka"

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        group: str,
        handler: Callable[..., Any],
        topics: Sequence[str] = (),
        pattern: str | None = None,
        inbox: AsyncInbox | None = None,
    ) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("OUTBOX_KAFKA_BOOTSTRAP is required to consume from Kafka")
        if bool(topics) == bool(pattern):
            raise ValueError("give Kafka topics or a pattern (one of them)")
        self.settings = settings
        self.group = group
        self.topics = list(topics)
        self.pattern = pattern
        self.inbox = inbox or AsyncInbox(group, schema=settings.schema_name)
        self.metrics = ConsumerMetrics(group, self.system)
        self.processor = Processor(settings, self.inbox, handler, self.metrics, self.system)
        self.stopping = asyncio.Event()
        self.started = False
        self.connected = False
        self._consumer: AIOKafkaConsumer | None = None
        self._workers: dict[TopicPartition, _PartitionWorker] = {}
        self._delays = RetryDelay(0.2, settings.consumer_backoff_max)

    def request_stop(self) -> None:
        self.stopping.set()

    def readiness(self) -> dict[str, bool]:
        return {"started": self.started, "database": self.processor.database_ok, "kafka": self.connected}

    async def run(self) -> None:
        """Until request_stop(): then finishes the records in progress, commits, leaves the group."""
        if not await self.processor.open(self.stopping):
            return
        stale = asyncio.create_task(self.processor.report_stale_locks(self.stopping))
        try:
            consumer = await self._connect()
            if consumer is None:
                return
            self._consumer = consumer
            self.started = True
            try:
                await self._fetch_loop(consumer)
            finally:
                await self._release(list(self._workers), reason="stopping")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 30)  # leaves the group
                log.info("left consumer group %s", self.group)
        finally:
            self.stopping.set()
            await stale
            await self.processor.close()

    def _options(self) -> dict[str, Any]:
        s = self.settings
        session_ms = int(s.kafka_session_timeout * 1000)
        options: dict[str, Any] = {
            "bootstrap_servers": s.kafka_bootstrap,
            "group_id": self.group,
            "client_id": f"outbox-consumer-{self.inbox.worker_id}",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": session_ms,
            "heartbeat_interval_ms": max(100, session_ms // 4),
            "rebalance_timeout_ms": int(max(s.consumer_shutdown_grace, s.kafka_session_timeout) * 1000),
            "metadata_max_age_ms": int(s.kafka_metadata_max_age * 1000),
            "max_poll_interval_ms": 3_600_000,  # a slow retry must not get the member thrown out
            "fetch_max_wait_ms": 100,
            "security_protocol": s.kafka_security_protocol,
        }
        if s.kafka_sasl_mechanism:
            options["sasl_mechanism"] = s.kafka_sasl_mechanism
            options["sasl_plain_username"] = s.kafka_sasl_username
            if s.kafka_sasl_password is not None:
                options["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value()
        return options

    async def _connect(self) -> AIOKafkaConsumer | None:
        """Starts the consumer, waiting for the broker as long as it takes (None if stopped meanwhile)."""
        attempt = 0
        while not self.stopping.is_set():
            consumer = AIOKafkaConsumer(**self._options())
            listener = _Rebalance(self)
            if self.pattern:
                consumer.subscribe(pattern=self.pattern, listener=listener)
            else:
                consumer.subscribe(self.topics, listener=listener)
            try:
                await consumer.start()
            except KafkaError as exc:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                attempt += 1
                self.metrics.counted(self.metrics.errors, kind="broker_unavailable")
                log.warning("kafka not reachable yet (%s); retrying", exc)
                await wait_or_abandon(self.stopping, self._delays.delay(attempt))
                continue
            self.connected = True
            log.info("consuming %s in group %s", self.pattern or ",".join(self.topics), self.group)
            return consumer
        return None

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                batches = await consumer.getmany(
                    timeout_ms=500, max_records=self.settings.consumer_batch_size
                )
            except KafkaError as exc:
                attempt += 1
                self.connected = False
                self.metrics.counted(self.metrics.errors, kind="broker_unavailable")
                log.warning("kafka fetch failed (%s); retrying", exc)
                await wait_or_abandon(self.stopping, self._delays.delay(attempt))
                continue
            attempt = 0
            self.connected = True
            for tp, records in batches.items():
                if not records or tp not in consumer.assignment():
                    continue
                worker = self._workers.get(tp)
                if worker is None or worker.abandon.is_set():
                    worker = self._workers[tp] = _PartitionWorker(self, tp)
                consumer.pause(tp)
                worker.batches.put_nowait(records)

    async def _handle(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], abandon: asyncio.Event
    ) -> bool:
        """Settles one record; False when let go before it settled (its offset is not committed)."""
        try:
            message = kafka_message(
                record.topic, record.partition, record.offset, record.key, record.value, list(record.headers)
            )
        except InvalidMessageError as exc:
            self._invalid(exc.reason, str(exc))
            return True
        attributes = span_attributes(message, self.system, self.group, record.partition, record.offset)
        try:
            result = await self.processor.settle(message, abandon, attributes)
        except InboxValidationError as exc:
            self._invalid("invalid_message", f"{message.source}: {exc}")
            return True
        if result is None:
            return False
        if result.outcome is InboxOutcome.GAVE_UP:
            log.error(
                "gave up on %s after %d attempts: %s (kept as 'failed' in the inbox; offset committed)",
                message.source, result.attempts, result.error,
            )
        return True

    def _invalid(self, reason: str, detail: str) -> None:
        """Logged and counted; the offset moves past it (it can never be processed; nothing is marked
        processed). Its coordinates are in the log for an operator to replay it."""
        self.metrics.counted(self.metrics.invalid, reason=reason)
        log.error("skipping a message that cannot be processed (%s): %s", reason, detail)

    async def _release(self, tps: list[TopicPartition], reason: str) -> None:
        """Lets the partitions' workers finish the record in progress (up to the shutdown grace),
        then commits what they settled."""
        workers = [self._workers.pop(tp) for tp in tps if tp in self._workers]
        for worker in workers:
            worker.abandon.set()
        if not workers:
            return
        tasks = [worker.task for worker in workers]
        _done, late = await asyncio.wait(tasks, timeout=self.settings.consumer_shutdown_grace)
        for task in late:  # the inbox gives the claim back; the record is redelivered
            log.warning("handler still running after %.0fs (%s); cancelling it",
                        self.settings.consumer_shutdown_grace, task.get_name())
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=10)
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.commit()
        log.info("released %d partition(s) (%s)", len(workers), reason)

    async def _commit(self, tp: TopicPartition, offset: int) -> bool:
        consumer = self._consumer
        if consumer is None:
            return False
        try:
            await consumer.commit({tp: OffsetAndMetadata(offset, "")})
            return True
        except Exception as exc:  # a rebalance in progress, the broker away: redelivered, then skipped
            self.metrics.counted(self.metrics.errors, kind="commit_failed")
            log.warning("cannot commit %s[%d]@%d (%s); its records may be redelivered (the inbox skips them)",
                        tp.topic, tp.partition, offset, type(exc).__name__)
            return False

    def _resume(self, tp: TopicPartition) -> None:
        consumer = self._consumer
        if consumer is not None and tp in consumer.assignment():
            consumer.resume(tp)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        consumer = self._consumer
        if consumer is not None and tp in consumer.assignment():
            consumer.seek(tp, offset)
