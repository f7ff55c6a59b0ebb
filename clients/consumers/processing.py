"""Running one message through the inbox until it is settled: what both consumers share.

settle() returns the result to act on (PROCESSED, DUPLICATE: commit/ack; GAVE_UP: park), or None
when it was told to let go (stop, lost partition or stream) before the message settled, in which
case the caller commits or acknowledges nothing. LOCKED and FAILED are tried again with backoff, in
place, so the partition's (stream's) later messages wait and per-key order holds; so is a database
outage (never a dead letter, never a stopped consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Status, StatusCode

from clients.consumers.faults import error_kind, is_transient_database_error
from clients.consumers.metrics import ConsumerMetrics
from clients.consumers.settings import ConsumerSettings
from clients.consumers.tracing import process_span
from clients.inbox import AsyncInbox, InboxMessage, InboxOutcome, InboxResult

log = logging.getLogger("clients.consumers")

SETTLED = (InboxOutcome.PROCESSED, InboxOutcome.DUPLICATE, InboxOutcome.GAVE_UP)
STALE_LOCK_REPORT_INTERVAL = 30.0


@dataclass(frozen=True)
class RetryDelay:
    """Exponential backoff with equal jitter, between `initial` and `maximum` seconds."""

    initial: float
    maximum: float

    def delay(self, attempt: int) -> float:
        exponential = min(self.maximum, self.initial * 2 ** min(max(attempt - 1, 0), 30))
        return exponential / 2 + random.uniform(0, exponential / 2)


def needs_retry(result: InboxResult) -> bool:
    return result.outcome not in SETTLED


async def wait_or_abandon(abandon: asyncio.Event, seconds: float) -> bool:
    """Sleeps `seconds`; True (at once) when `abandon` is set meanwhile."""
    if abandon.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):  # not wait_for: on 3.11 it can swallow a cancellation
            await abandon.wait()
    return abandon.is_set()


class Processor:
    """The inbox, the handler and a connection pool (asyncpg), with bounded concurrency."""

    def __init__(
        self,
        settings: ConsumerSettings,
        inbox: AsyncInbox,
        handler: Callable[..., Any],
        metrics: ConsumerMetrics,
        system: str,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.handler = handler
        self.metrics = metrics
        self.system = system
        self.delays = RetryDelay(settings.consumer_backoff_initial, settings.consumer_backoff_max)
        self._slots = asyncio.Semaphore(settings.consumer_concurrency)
        self.pool: Any = None
        self.database_ok = False

    async def open(self, abandon: asyncio.Event) -> bool:
        """Opens the pool, waiting for the database (up to OUTBOX_CONSUMER_STARTUP_TIMEOUT), and checks
        that the inbox table exists. False when stopped meanwhile; raises SchemaBehind or TimeoutError."""
        import asyncpg

        limit = self.settings.consumer_startup_timeout
        deadline = time.monotonic() + limit if limit else float("inf")
        attempt = 0
        while True:
            try:
                pool = await asyncpg.create_pool(
                    self.settings.database_url.get_secret_value(),
                    min_size=1,
                    max_size=self.settings.consumer_concurrency + 1,
                    command_timeout=60,
                )
                break
            except Exception as exc:
                if not is_transient_database_error(exc):
                    raise
                attempt += 1
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the database was unavailable for {limit:.0f}s ({type(exc).__name__})"
                    ) from None
                log.warning("database not reachable yet (%s); retrying", type(exc).__name__)
                if await wait_or_abandon(abandon, self.delays.delay(attempt)):
                    return False
        self.pool = pool
        table = f"{self.settings.schema_name}.inbox"
        if await pool.fetchval("SELECT to_regclass($1)", table) is None:
            await pool.close()
            self.pool = None
            raise SchemaBehindError(
                f"schema {self.settings.schema_name!r} has no inbox table: run `outbox-relay migrate` first"
            )
        self.database_ok = True
        return True

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)

    async def settle(
        self, message: InboxMessage, abandon: asyncio.Event, attributes: dict[str, str | int]
    ) -> InboxResult | None:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._slots:
                    result = await self._process_once(message, attributes)
            except Exception as exc:
                kind = error_kind(exc)
                self.metrics.counted(self.metrics.errors, kind=kind)
                if kind == "database_unavailable":
                    self.database_ok = False
                    log.warning("database unavailable while processing %s (%s: %s); retrying",
                                message.source, type(exc).__name__, exc)
                else:  # a bug, or a state no retry repairs (say a revoked grant): loud, and retried
                    log.error("cannot process %s; retrying", message.source, exc_info=True)
                if await wait_or_abandon(abandon, self.delays.delay(attempt)):
                    return None
                continue
            self.database_ok = True
            if not needs_retry(result):
                self.metrics.counted(self.metrics.settled, outcome=result.outcome.value)
                return result
            self.metrics.counted(self.metrics.retries, outcome=result.outcome.value)
            delay = self.delays.delay(attempt)
            if result.outcome is InboxOutcome.LOCKED:
                log.info("%s is locked by another worker (%s); trying again in %.1fs",
                         message.source, result.holder or "unknown", delay)
            else:
                log.warning("handler failed on %s (attempt %d): %s; trying again in %.1fs",
                            message.source, result.attempts, result.error, delay)
            if await wait_or_abandon(abandon, delay):
                return None

    async def _process_once(self, message: InboxMessage, attributes: dict[str, str | int]) -> InboxResult:
        started = time.perf_counter()
        with process_span(message, attributes) as span:
            async with self.pool.acquire() as conn:
                result = await self.inbox.process(conn, message, self.handler)
            span.set_attribute("outbox.inbox.outcome", result.outcome.value)
            span.set_attribute("outbox.inbox.attempts", result.attempts)
            if result.outcome in (InboxOutcome.FAILED, InboxOutcome.GAVE_UP):
                span.set_status(Status(StatusCode.ERROR, result.error or result.outcome.value))
        self.metrics.handling.record(time.perf_counter() - started, {"outcome": result.outcome.value})
        return result

    async def report_stale_locks(self, abandon: asyncio.Event) -> None:
        """Feeds the outbox_inbox_stale_locks gauge until `abandon` is set."""
        while not abandon.is_set():
            with contextlib.suppress(Exception):
                async with self.pool.acquire() as conn:
                    await self.inbox.count_stale_locks(conn)
            if await wait_or_abandon(abandon, STALE_LOCK_REPORT_INTERVAL):
                return


class SchemaBehindError(RuntimeError):
    """The schema lacks the inbox table (migration 0006): run `outbox-relay migrate`."""
