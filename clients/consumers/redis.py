"""The Redis Streams consumer: a consumer group over a plain stream or the relay's sharded streams
('topic:0' ... 'topic:N-1'), whose entries go through the inbox.

One worker per stream, and one member of the group at a time per stream (clients.consumers.ownership):
entries are handled one at a time in id order, so per-key order holds (a key always maps to one
shard). The group is created idempotently (XGROUP CREATE ... MKSTREAM, from the stream's start).
A worker that takes a stream over first claims every entry still pending in it (XAUTOCLAIM: they
were delivered to a member that lost or gave the stream away, so it will not acknowledge them), in
id order, before it reads new ones (XREADGROUP >); while it owns the stream it also reclaims entries
idle past OUTBOX_REDIS_CLAIM_IDLE. An entry is acknowledged (XACK) only once the inbox settled it.
Given up by the inbox, without a message-id, or delivered more than OUTBOX_REDIS_MAX_DELIVERIES
times, an entry is moved to '<stream>:dlq' with the reason (dead-letter-reason field), then
acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from clients.consumers.messages import InvalidMessageError, redis_message, shard_streams
from clients.consumers.metrics import ConsumerMetrics
from clients.consumers.ownership import StreamOwnership
from clients.consumers.processing import Processor, RetryDelay, wait_or_abandon
from clients.consumers.settings import ConsumerSettings
from clients.consumers.tracing import span_attributes
from clients.inbox import AsyncInbox, InboxOutcome, InboxValidationError

log = logging.getLogger("clients.consumers.redis")

Entry = tuple[bytes, dict[bytes, bytes]]


READ_TIMEOUT = 10.0  # seconds; see RedisInboxConsumer.run


def dlq_stream(stream: str) -> str:
    return f"{stream}:dlq"


class _StreamWorker:
    def __init__(self, owner: RedisInboxConsumer, stream: str) -> None:
        self.owner = owner
        self.stream = stream
        self.abandon = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"redis-{stream}")

    async def _run(self) -> None:
        owner, attempt = self.owner, 0
        claimed_all = False
        last_reclaim = time.monotonic()
        while not self.abandon.is_set():
            try:
                if not claimed_all:  # the previous owner's pending entries first, in order
                    await owner._reclaim(self.stream, 0, self.abandon)
                    claimed_all, last_reclaim = True, time.monotonic()
                elif time.monotonic() - last_reclaim > owner.reclaim_interval:
                    await owner._reclaim(self.stream, int(owner.settings.redis_claim_idle * 1000), self.abandon)
                    last_reclaim = time.monotonic()
                entries = await owner._read(self.stream)
                owner.connected = True
                attempt = 0
                for entry_id, fields in entries:
                    if not await owner._handle(self.stream, entry_id, fields, 1, self.abandon):
                        break  # let go: stays pending, the next owner claims it
            except (RedisError, OSError) as exc:
                attempt += 1
                # An XREADGROUP whose reply was lost still delivered its entries: they wait in this
                # member's pending list, which `>` never reads again. Take them first, in order.
                claimed_all = False
                owner.connected = False
                owner.metrics.counted(owner.metrics.errors, kind="broker_unavailable")
                log.warning("redis unavailable for %s (%s); retrying", self.stream, type(exc).__name__)
                await wait_or_abandon(self.abandon, owner.delays.delay(attempt))
            except Exception:  # never die silently
                attempt += 1
                claimed_all = False
                log.exception("worker of %s failed; retrying", self.stream)
                await wait_or_abandon(self.abandon, owner.delays.delay(attempt))


class RedisInboxConsumer:
    """Consumes the streams of `topics` (each sharded over `shards` streams when shards > 0) in
    consumer group `group` through `AsyncInbox(group)`: run() until request_stop()."""

    system = "redis"

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        group: str,
        handler: Callable[..., Any],
        topics: Sequence[str],
        shards: int = 0,
        inbox: AsyncInbox | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        if settings.redis_url is None and client is None:
            raise ValueError("OUTBOX_REDIS_URL is required to consume from Redis Streams")
        if not topics:
            raise ValueError("give at least one Redis stream (topic)")
        self.settings = settings
        self.group = group
        self.streams = shard_streams(topics, shards)
        self.inbox = inbox or AsyncInbox(group, schema=settings.schema_name)
        self.name = self.inbox.worker_id  # the group member's name: POD_NAME, else hostname:pid
        self.metrics = ConsumerMetrics(group, self.system)
        self.processor = Processor(settings, self.inbox, handler, self.metrics, self.system)
        self.delays = RetryDelay(0.2, settings.consumer_backoff_max)
        self.reclaim_interval = max(0.5, min(settings.redis_claim_idle / 2, 30.0))
        self.stopping = asyncio.Event()
        self.started = False
        self.connected = False
        self._client = client
        self._own_client = client is None
        self._workers: dict[str, _StreamWorker] = {}
        self._groups_made: set[str] = set()

    def request_stop(self) -> None:
        self.stopping.set()

    def readiness(self) -> dict[str, bool]:
        return {"started": self.started, "database": self.processor.database_ok, "redis": self.connected}

    @property
    def owned(self) -> list[str]:
        return sorted(self._workers)

    async def run(self) -> None:
        """Until request_stop(): then finishes the entries in progress, acknowledges, gives its streams
        back (other members take them at once) and leaves."""
        if not await self.processor.open(self.stopping):
            return
        if self._client is None:
            assert self.settings.redis_url is not None
            # A read timeout far above XREADGROUP's 0.5 s block: a connection that silently stopped
            # answering (a half-open TCP connection, a proxy that accepted and went away) fails and
            # is replaced, instead of holding its stream's worker for ever.
            self._client = aioredis.from_url(
                self.settings.redis_url.get_secret_value(),
                socket_connect_timeout=5,
                socket_timeout=READ_TIMEOUT,
                health_check_interval=10,
            )
        ownership = StreamOwnership(
            self._client, self.group, self.name, self.streams, self.settings.redis_lease_ttl
        )
        stale = asyncio.create_task(self.processor.report_stale_locks(self.stopping))
        self.started = True
        log.info("consuming %s in group %s as %s", ",".join(self.streams), self.group, self.name)
        try:
            await self._own_streams(ownership)
        finally:
            await self._let_go(list(self._workers), ownership, "stopping")
            with contextlib.suppress(Exception):
                await ownership.leave()
            self.stopping.set()
            await stale
            if self._own_client:
                with contextlib.suppress(Exception):
                    await self._client.aclose()
            await self.processor.close()

    async def _own_streams(self, ownership: StreamOwnership) -> None:
        """Every third of the lease TTL: renew, take free streams up to the fair share, give back the
        surplus; start and stop the workers accordingly."""
        attempt = 0
        interval = self.settings.redis_lease_ttl / 3
        while not self.stopping.is_set():
            try:
                kept, acquired, surplus = await ownership.plan(set(self._workers))
                lost = set(self._workers) - kept - surplus
                if lost:
                    log.warning("lost the lease of %s; stopping its worker", ", ".join(sorted(lost)))
                    await self._let_go(sorted(lost), None, "lease lost")
                if surplus:
                    await self._let_go(sorted(surplus), ownership, "rebalanced")
                for stream in sorted(acquired):
                    await self._ensure_group(stream)
                    self._workers[stream] = _StreamWorker(self, stream)
                if acquired:
                    log.info("took over %s; now owning %s", ", ".join(sorted(acquired)), ", ".join(self.owned))
                self.connected = True
                attempt = 0
                delay = interval
            except (RedisError, OSError) as exc:
                attempt += 1
                self.connected = False
                self.metrics.counted(self.metrics.errors, kind="broker_unavailable")
                log.warning("redis unavailable (%s); retrying", type(exc).__name__)
                delay = min(interval, self.delays.delay(attempt))
            await wait_or_abandon(self.stopping, delay)

    async def _let_go(self, streams: list[str], ownership: StreamOwnership | None, reason: str) -> None:
        """Stops the streams' workers after the entry in progress (up to the shutdown grace), then
        releases their leases (when `ownership` is given) so another member takes them at once."""
        workers = [self._workers.pop(stream) for stream in streams if stream in self._workers]
        for worker in workers:
            worker.abandon.set()
        if not workers:
            return
        tasks = [worker.task for worker in workers]
        _done, late = await asyncio.wait(tasks, timeout=self.settings.consumer_shutdown_grace)
        for task in late:
            log.warning("handler still running after %.0fs (%s); cancelling it",
                        self.settings.consumer_shutdown_grace, task.get_name())
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=10)
        if ownership is not None:
            for worker in workers:
                with contextlib.suppress(Exception):
                    await ownership.release(worker.stream)
        log.info("released %s (%s)", ", ".join(w.stream for w in workers), reason)

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups_made:
            return
        assert self._client is not None
        try:
            await self._client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_made.add(stream)

    async def _read(self, stream: str) -> list[Entry]:
        assert self._client is not None
        await self._ensure_group(stream)
        try:
            reply: Any = await self._client.xreadgroup(
                self.group, self.name, {stream: ">"}, count=self.settings.consumer_batch_size, block=500
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted: make the group again
                self._groups_made.discard(stream)
            raise
        return [(entry_id, fields) for _name, entries in reply or [] for entry_id, fields in entries]

    async def _reclaim(self, stream: str, min_idle_ms: int, abandon: asyncio.Event) -> None:
        """XAUTOCLAIM the stream's pending entries idle for `min_idle_ms` (0: all of them), in id order,
        and handle them; entries delivered too often go to the dead-letter stream."""
        assert self._client is not None
        await self._ensure_group(stream)
        start = "0-0"
        while not abandon.is_set():
            reply = await self._client.xautoclaim(
                stream, self.group, self.name, min_idle_ms, start_id=start, count=self.settings.consumer_batch_size
            )
            start_next, entries = reply[0], reply[1]
            live = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
            deleted = [entry_id for entry_id, fields in entries if fields is None]
            if deleted:  # trimmed away (MAXLEN) while pending: nothing to process
                await self._client.xack(stream, self.group, *deleted)
            if live:
                log.info("claimed %d pending entr%s of %s", len(live), "y" if len(live) == 1 else "ies", stream)
                deliveries = await self._deliveries(stream, [entry_id for entry_id, _ in live])
                for entry_id, fields in live:
                    if not await self._handle(stream, entry_id, fields, deliveries.get(entry_id, 1), abandon):
                        return
            if start_next in (b"0-0", "0-0"):
                return
            start = start_next

    async def _deliveries(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        assert self._client is not None
        pending: Any = await self._client.xpending_range(
            stream, self.group, min=ids[0], max=ids[-1], count=len(ids) + 100, consumername=self.name
        )
        return {item["message_id"]: int(item["times_delivered"]) for item in pending}

    async def _handle(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, abandon: asyncio.Event
    ) -> bool:
        """Settles one entry and acknowledges it; False when let go before it settled (not acknowledged)."""
        max_deliveries = self.settings.redis_max_deliveries
        if deliveries > max_deliveries:
            await self._dead_letter(
                stream, entry_id, fields, "max_deliveries",
                f"delivered {deliveries} times (OUTBOX_REDIS_MAX_DELIVERIES={max_deliveries}) without being settled",
            )
            return True
        try:
            message = redis_message(stream, entry_id, fields)
        except InvalidMessageError as exc:
            self.metrics.counted(self.metrics.invalid, reason=exc.reason)
            log.error("cannot process %s/%s: %s", stream, entry_id.decode(), exc)
            await self._dead_letter(stream, entry_id, fields, exc.reason, str(exc))
            return True
        attributes = span_attributes(message, self.system, self.group)
        try:
            result = await self.processor.settle(message, abandon, attributes)
        except InboxValidationError as exc:
            self.metrics.counted(self.metrics.invalid, reason="invalid_message")
            log.error("cannot process %s: %s", message.source, exc)
            await self._dead_letter(stream, entry_id, fields, "invalid_message", str(exc))
            return True
        if result is None:
            return False
        if result.outcome is InboxOutcome.GAVE_UP:
            log.error("gave up on %s after %d attempts: %s; moving it to %s",
                      message.source, result.attempts, result.error, dlq_stream(stream))
            await self._dead_letter(stream, entry_id, fields, "gave_up", result.error or "handler failed")
            return True
        await self._acknowledge(stream, entry_id)
        return True

    async def _acknowledge(self, stream: str, entry_id: bytes) -> None:
        """XACK, retried through an outage (a settled entry redelivered is a duplicate the inbox skips,
        but acknowledging it avoids that round)."""
        assert self._client is not None
        attempt = 0
        while True:
            try:
                await self._client.xack(stream, self.group, entry_id)
                return
            except (RedisError, OSError) as exc:
                attempt += 1
                self.metrics.counted(self.metrics.errors, kind="broker_unavailable")
                if self.stopping.is_set() and attempt > 3:
                    log.warning("cannot acknowledge %s/%s (%s); it will be redelivered and skipped",
                                stream, entry_id.decode(), type(exc).__name__)
                    return
                await asyncio.sleep(self.delays.delay(attempt))

    async def _dead_letter(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], reason: str, detail: str
    ) -> None:
        """XADD to '<stream>:dlq' (the entry's fields, the reason, where it came from) and XACK, in one
        MULTI/EXEC: never acknowledged without its dead letter. Retried through an outage."""
        assert self._client is not None
        letter: dict[Any, Any] = dict(fields)
        letter.update({
            "dead-letter-reason": reason,
            "dead-letter-detail": detail[:2000],
            "dead-letter-source": f"{stream}/{entry_id.decode()}",
            "dead-letter-group": self.group,
        })
        attempt = 0
        while True:
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.xadd(dlq_stream(stream), letter)
                    pipe.xack(stream, self.group, entry_id)
                    await pipe.execute()
                break
            except (RedisError, OSError) as exc:
                attempt += 1
                self.metrics.counted(self.metrics.errors, kind="broker_unavailable")
                log.warning("cannot move %s/%s to %s (%s); retrying",
                            stream, entry_id.decode(), dlq_stream(stream), type(exc).__name__)
                await asyncio.sleep(self.delays.delay(attempt))
        self.metrics.counted(self.metrics.dead_letters, reason=reason)
        log.warning("moved %s/%s to %s: %s", stream, entry_id.decode(), dlq_stream(stream), reason)
