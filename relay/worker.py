"""One partition's loop: claim in id order, publish, wait for acknowledgement, settle.

A partition has at most one worker fleet-wide (its lease), and that worker runs one batch at a
time, so per-key order within the partition follows from id order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from relay.budget import ByteBudget, row_bytes
from relay.config import RelaySettings
from relay.events import OutboxRow, Outcome, PublishResult
from relay.leases import Lease
from relay.pauses import PauseState
from relay.retry import FailureBackoff, RetryPolicy
from relay.sinks.router import Router
from relay.store import TRANSIENT_DB_ERRORS, RelayStore
from relay.telemetry import RelayMetrics
from relay.tracing import batch_span, end_publish_spans, start_publish_spans, tracing_enabled

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchPlan:
    """What to do with a claimed batch before anything is sent."""

    send: list[OutboxRow] = field(default_factory=list)
    reject: list[tuple[OutboxRow, PublishResult]] = field(default_factory=list)
    held: list[OutboxRow] = field(default_factory=list)


def plan_batch(rows: Sequence[OutboxRow], max_payload_bytes: int) -> BatchPlan:
    """A retried event goes alone for its key: the key's later events in the batch wait for it."""
    plan = BatchPlan()
    waiting: set[tuple[str, str]] = set()
    for row in rows:
        key = row.ordering_key
        if key is not None and key in waiting:
            plan.held.append(row)
        elif len(row.payload) > max_payload_bytes:
            plan.reject.append(
                (
                    row,
                    PublishResult(
                        Outcome.REJECT,
                        "payload_too_large",
                        f"payload is {len(row.payload)} bytes, over OUTBOX_MAX_PAYLOAD_BYTES={max_payload_bytes}",
                    ),
                )
            )
        else:
            plan.send.append(row)
            if key is not None and row.attempts > 0:
                waiting.add(key)
    return plan


@dataclass(slots=True)
class Settlement:
    """What the store must record after a publish."""

    published: list[OutboxRow] = field(default_factory=list)
    retry: list[tuple[OutboxRow, float, str]] = field(default_factory=list)
    dead: list[tuple[OutboxRow, str, str]] = field(default_factory=list)
    unavailable: int = 0  # rows left as they were: their sink or topic could not take them
    deferred: int = 0  # rows left as they were: not sent, behind an earlier event of their key
    out_of_order: list[OutboxRow] = field(default_factory=list)  # accepted behind a failed one


def settle_plan(
    sent: Sequence[OutboxRow], results: Sequence[PublishResult], policy: RetryPolicy
) -> Settlement:
    """Per result: settle, schedule a retry, or archive. After a failure, the same key's later
    events are left untouched (no attempt counted) so they stay behind it. The sinks never send an
    event behind a failed one of its key (a later event is DEFERRED instead); should one be
    accepted anyway it is settled, since publishing it again would not undo that, and reported."""
    out = Settlement()
    waiting: set[tuple[str, str]] = set()  # keys with an event left in the outbox by this batch
    for row, result in zip(sent, results, strict=True):
        key = row.ordering_key
        if result.ok:
            out.published.append(row)
            if key is not None and key in waiting:
                out.out_of_order.append(row)
        elif result.outcome is Outcome.REJECT:  # the event's own verdict: no later event waits on it
            out.dead.append((row, result.reason, result.error))
        elif result.outcome is Outcome.DEFERRED:
            out.deferred += 1
            if key is not None:
                waiting.add(key)
        elif key is not None and key in waiting:
            continue  # behind an earlier failure of its key: no attempt counted
        elif result.outcome is Outcome.UNAVAILABLE:
            out.unavailable += 1
            if key is not None:
                waiting.add(key)
        elif policy.exhausted(row.attempts):
            out.dead.append((row, "max_attempts", f"{result.reason}: {result.error}"))
        else:
            out.retry.append(
                (row, policy.backoff.delay(row.attempts + 1), f"{result.reason}: {result.error}")
            )
            if key is not None:
                waiting.add(key)
    return out


@dataclass
class WorkerContext:
    settings: RelaySettings
    store: RelayStore
    router: Router
    pauses: PauseState
    policy: RetryPolicy
    metrics: RelayMetrics
    lease_lost: Callable[[int], None]
    budget: ByteBudget  # OUTBOX_INFLIGHT_MAX_BYTES, shared by every partition worker of the process


class PartitionWorker:
    def __init__(self, partition: int, lease: Lease, ctx: WorkerContext) -> None:
        self.partition = partition
        self.lease = lease
        self._ctx = ctx
        self._wake = asyncio.Event()
        self._stopping = False
        self._next_retry_at: float | None = None
        self._db_backoff = FailureBackoff(0.1, 5.0)
        self._crash_backoff = FailureBackoff(1.0, 30.0)
        # A publish we stopped waiting for: the producer may still deliver it, so its rows are not
        # claimed (and sent) again until it resolves. Otherwise every wait during an outage would
        # queue one more copy of the batch for delivery once the broker is back.
        self._inflight: tuple[BatchPlan, asyncio.Task[list[PublishResult]]] | None = None
        # Bytes of ctx.budget this worker holds for its current batch (kept while it is in flight).
        self._held_bytes = 0
        # The last batch's acknowledged rows, not yet marked done in the outbox: the next claim does
        # that in the same statement, or `_settle_by` (monotonic) passes and the loop claims then. So
        # at most one batch per partition is ever published and unsettled, as before: a claim always
        # settles the batch before it, and nothing is published before its claim returns.
        self._unsettled: list[OutboxRow] = []
        self._acked_at = datetime.now(UTC)
        self._settle_by: float | None = None

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the batch in flight, then return."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Stopped, cancelled or given up on a publish never acknowledged: the worker's share of
            # the in-flight budget goes back (exactly once: _release_held zeroes what it returns).
            self._release_held()

    async def _run(self) -> None:
        ctx = self._ctx
        while not self._stopping:
            self._wake.clear()
            full = False
            try:
                if self._may_work():
                    full = await self.process_batch()
                elif self._unsettled:  # paused, or the lease not trusted: mark done what was published
                    await self._settle_alone()
                self._db_backoff.succeeded()
            except TRANSIENT_DB_ERRORS as exc:
                ctx.metrics.database_error(exc)
                delay = self._db_backoff.failed()
                log.warning(
                    "partition %s: database error %s; retrying in %.1fs",
                    self.partition,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except Exception:
                # A bug must not silently end the partition while its lease is still renewed.
                delay = self._crash_backoff.failed()
                ctx.metrics.task_restarted("partition")
                log.exception("partition %s: unexpected error; retrying in %.1fs", self.partition, delay)
                await asyncio.sleep(delay)
                continue
            self._crash_backoff.succeeded()
            if full and not self._stopping:
                continue
            await self._idle(ctx.settings.poll_interval)
        await self._settle_inflight_on_stop()

    async def _settle_inflight_on_stop(self) -> None:
        """On the way out, settle what was published and a publish still awaiting its
        acknowledgement if the lease allows, so the next owner does not send them again."""
        if self.lease.remaining() <= 0:
            return
        with contextlib.suppress(*TRANSIENT_DB_ERRORS, PublishCrashedError):
            if self._inflight is not None:
                await self.process_batch()
            if self._unsettled:
                await self._settle_alone()

    def _may_work(self) -> bool:
        return not self._ctx.pauses.globally_paused and self.lease.remaining() > 0

    async def _idle(self, poll_interval: float) -> None:
        timeout = poll_interval
        if self._next_retry_at is not None:
            timeout = max(0.0, min(timeout, self._next_retry_at - time.monotonic()))
            self._next_retry_at = None
        if self._settle_by is not None:  # the claim that marks the last batch done is due then
            timeout = max(0.0, min(timeout, self._settle_by - time.monotonic()))
        probe = self._ctx.router.availability.next_probe_in()
        if probe is not None:  # a sink or topic outage's backoff ends: its rows may be claimed again
            timeout = min(timeout, probe + 0.01)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await self._wake.wait()

    async def process_batch(self) -> bool:
        """One claim-publish-settle round. True when the batch was full (more may be waiting)."""
        if self._inflight is not None:
            plan, task = self._inflight
            try:
                results = await self._await_publish(task)
                if results is None:
                    return False
                self._inflight = None
                return await self._after_publish(plan, results, claimed=len(plan.send))
            finally:
                if self._inflight is None:  # settled, or the publish failed and was forgotten
                    self._release_held()
        ctx, settings = self._ctx, self._ctx.settings
        max_bytes = settings.claim_max_bytes
        if not await self._reserve(max_bytes):
            return False
        try:
            claim_started = time.monotonic()
            rows = await self._claim(max_bytes)
            sizes = [row_bytes(row) for row in rows]
            self._keep_held(sum(sizes))
            if not rows:
                return False
            ctx.metrics.claimed(len(rows), time.monotonic() - claim_started)
            # A claim the byte budget cut short is as full as one of batch_size rows: more may wait.
            # (The next row is unknown; one as large as the largest here would not have fitted.)
            full = len(rows) >= settings.batch_size or sum(sizes) + max(sizes) > max_bytes
            plan = plan_batch(rows, settings.max_payload_bytes)
            results = await self._publish(plan)
            if results is None:
                return False
            return await self._after_publish(
                plan, results, claimed=settings.batch_size if full else len(rows)
            )
        finally:
            if self._inflight is None:  # settled or dropped; a batch still in flight keeps its bytes
                self._release_held()

    async def _claim(self, max_bytes: int) -> list[OutboxRow]:
        """The next batch; the same statement marks the last batch's published rows done. Nothing
        is claimed when the lease turns out lost there."""
        ctx, settings, fence = self._ctx, self._ctx.settings, self.lease.fence
        args = (self.partition, settings.batch_size, ctx.pauses.like_patterns, fence)
        skip = ctx.router.availability.skip_topics()
        if not self._unsettled:
            return await ctx.store.claim_batch(*args, max_bytes=max_bytes, skip_topics=skip)
        started = time.monotonic()
        settled, rows = await ctx.store.settle_and_claim(
            [row.id for row in self._unsettled],
            *args,
            retain=settings.settle_mode == "retain",
            max_bytes=max_bytes,
            skip_topics=skip,
        )
        return rows if self._settled(settled, time.monotonic() - started) else []

    async def _settle_alone(self) -> None:
        ctx, started = self._ctx, time.monotonic()
        ids = [row.id for row in self._unsettled]
        settled = await ctx.store.settle(ids, self.lease.fence, retain=ctx.settings.settle_mode == "retain")
        self._settled(settled, time.monotonic() - started)

    def _settled(self, settled: int, seconds: float) -> bool:
        """Records that the unsettled rows were marked done; False (and the lease reported lost)
        when fewer than all of them were."""
        ctx, rows = self._ctx, self._unsettled
        self._unsettled, self._settle_by = [], None
        if settled < len(rows):
            fence = self.lease.fence
            log.warning(
                "partition %s: lease %s (token %s) lost before settling; %s events stay for the new owner",
                self.partition,
                fence.lease_name,
                fence.token,
                len(rows) - settled,
            )
            ctx.lease_lost(self.partition)
            return False
        ctx.metrics.published(rows, seconds, ctx.router, acknowledged_at=self._acked_at)
        return True

    async def _reserve(self, n: int) -> bool:
        """Takes n bytes of the shared budget for a claim, waiting in line while it is used up.
        False when the worker is stopped or loses its lease while it waits (nothing is held then)."""
        budget = self._ctx.budget
        assert self._held_bytes == 0, "a worker claims only when it holds no batch"
        if budget.try_acquire(n):
            self._held_bytes = n
            return True
        acquiring = asyncio.ensure_future(budget.acquire(n))
        try:
            while not acquiring.done():
                if self._stopping or self.lease.remaining() <= 0:
                    return False
                await asyncio.wait({acquiring}, timeout=0.25)
            acquiring.result()
            self._held_bytes = n
            return True
        finally:
            if not acquiring.done():
                acquiring.cancel()  # leaves the line, or gives back a grant it had not reported yet
            elif self._held_bytes == 0 and not acquiring.cancelled() and acquiring.exception() is None:
                budget.release(n)  # granted just as this wait was cancelled

    def _keep_held(self, used: int) -> None:
        """Gives back the part of the reservation the claimed rows do not use. (A single event larger
        than the claim budget keeps only the claim budget: asking for more could wait forever.)"""
        keep = min(used, self._held_bytes)
        if keep < self._held_bytes:
            self._ctx.budget.release(self._held_bytes - keep)
            self._held_bytes = keep

    def _release_held(self) -> None:
        held, self._held_bytes = self._held_bytes, 0
        if held:
            self._ctx.budget.release(held)

    async def _after_publish(self, plan: BatchPlan, results: list[PublishResult], claimed: int) -> bool:
        """Settles; True when more may be waiting. An outage does not pause the worker: the
        router's availability tracker makes the next claims skip the topics that cannot be sent."""
        ctx = self._ctx
        failures = Counter(
            result.reason or result.outcome.value
            for result in results
            if not result.ok and result.outcome is not Outcome.DEFERRED
        )
        for kind, count in failures.items():
            ctx.metrics.publish_failed(kind, count)
        outcome = settle_plan(plan.send, results, ctx.policy)
        outcome.dead.extend((row, r.reason, r.error) for row, r in plan.reject)
        if outcome.out_of_order:
            log.error(
                "partition %s: %s events were accepted behind a failed event of their key",
                self.partition,
                len(outcome.out_of_order),
            )
        more = outcome.deferred > 0 or claimed >= ctx.settings.batch_size
        await self._settle(outcome, at_once=more)
        return more

    async def _publish(self, plan: BatchPlan) -> list[PublishResult] | None:
        """Results per sent row, or None when nothing can be settled yet (the lease's trust window
        closed before sending, or the broker has not answered: see `_inflight`)."""
        rows = plan.send
        if not rows:
            return []
        if self.lease.remaining() <= 0:
            log.warning("partition %s: lease may have lapsed; not publishing", self.partition)
            return None
        if not tracing_enabled():
            return await self._start_publish(plan, rows)
        with batch_span(self.partition, len(rows)):
            router = self._ctx.router
            traced, spans = start_publish_spans(rows, self.partition, router)
            results = await self._start_publish(plan, traced)
            end_publish_spans(spans, results, rows, router)
            return results

    async def _start_publish(self, plan: BatchPlan, rows: list[OutboxRow]) -> list[PublishResult] | None:
        task = asyncio.create_task(self._ctx.router.publish(rows), name=f"publish-{self.partition}")
        results = await self._await_publish(task)
        if results is None:
            self._inflight = (plan, task)
        return results

    async def _await_publish(self, task: asyncio.Task[list[PublishResult]]) -> list[PublishResult] | None:
        """Waits for broker acknowledgement, but no longer than the lease may be trusted."""
        timeout = max(min(self._ctx.settings.publish_timeout, self.lease.remaining()), 0.1)
        try:
            await asyncio.wait({task}, timeout=timeout)  # never cancels the publish itself
            if not task.done():
                self._ctx.metrics.publish_failed("publish_timeout", 1)
                log.warning(
                    "partition %s: no broker acknowledgement within %.1fs; still waiting", self.partition, timeout
                )
                return None
            return task.result()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise
            self._inflight = None
            raise PublishCrashedError("the publish was cancelled under the worker") from None
        except Exception as exc:
            # A bug, or the sink torn down under it: nothing is known to be published and nothing
            # is the events' fault. Forget the publish (so the partition cannot stay wedged on it)
            # and let run() log it and back off; the rows stay in the outbox for the next claim.
            self._inflight = None
            raise PublishCrashedError(f"the publish failed unexpectedly: {exc!r}") from exc

    async def _settle(self, outcome: Settlement, at_once: bool) -> None:
        ctx, fence = self._ctx, self.lease.fence
        if outcome.published:
            assert not self._unsettled, "a claim settles the batch before it"
            self._unsettled = list(outcome.published)
            self._acked_at = datetime.now(UTC)
            self._settle_by = time.monotonic() + ctx.settings.settle_delay
            if at_once or ctx.settings.settle_delay <= 0:
                await self._settle_alone()
        if outcome.retry:
            rows, delays, errors = zip(*outcome.retry, strict=True)
            await ctx.store.record_failures([r.id for r in rows], delays, errors, fence)
            ctx.metrics.retried(rows)
            soonest = time.monotonic() + min(delays)
            self._next_retry_at = (
                soonest if self._next_retry_at is None else min(self._next_retry_at, soonest)
            )
        if outcome.dead:
            await self._dead_letter(outcome.dead)

    async def _dead_letter(self, dead: list[tuple[OutboxRow, str, str]]) -> None:
        ctx = self._ctx
        rows = [row for row, _, _ in dead]
        archived = await ctx.store.dead_letter(
            [r.id for r in rows],
            [reason for _, reason, _ in dead],
            [err for _, _, err in dead],
            self.lease.fence,
        )
        by_id = {row.id: row for row in rows}
        for entry in archived:
            row = by_id[entry.outbox_id]
            log.warning(
                "event dead-lettered",
                extra={
                    "topic": row.topic,
                    "partition": self.partition,
                    "message_id": str(row.message_id),
                    "reason": entry.reason,
                    "dead_letter_id": entry.archive_id,
                },
            )
            ctx.metrics.dead_lettered(row.topic, entry.reason)
        if ctx.settings.dlq_publish and archived:
            ctx.router.copy_dead_letters([(by_id[entry.outbox_id], entry.reason) for entry in archived])


class PublishCrashedError(RuntimeError):
    """A publish raised instead of answering per event."""
