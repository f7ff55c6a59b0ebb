"""PartitionWorker and the in-flight byte budget: bytes are taken before a claim, the unused part is
given back at once, the rest when the batch is settled, and everything exactly once, whatever happens
(a publish never acknowledged, a stop, a crash, a cancellation). Fakes only, no servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from relay.availability import Availability
from relay.budget import ByteBudget
from relay.config import RelaySettings, SinkKind
from relay.events import PUBLISHED, OutboxRow, PublishResult
from relay.leases import Lease
from relay.retry import Backoff, RetryPolicy
from relay.telemetry import RelayMetrics
from relay.worker import PartitionWorker, WorkerContext

KIB = 1024


def row(n: int, size: int) -> OutboxRow:
    return OutboxRow(n, uuid.uuid4(), "orders", None, b"x" * size, {}, datetime.now(UTC), 0)


class FakeStore:
    def __init__(self, rows: list[OutboxRow]) -> None:
        self.rows = rows
        self.claims: list[int] = []
        self.fail_claim: BaseException | None = None

    async def claim_batch(
        self,
        partition: int,
        limit: int,
        paused_like: Sequence[str],
        fence: Any,
        *,
        max_bytes: int,
        skip_topics: Sequence[str] = (),
    ) -> list[OutboxRow]:
        self.claims.append(max_bytes)
        if self.fail_claim is not None:
            raise self.fail_claim
        out, total = [], 0
        for r in self.rows[:limit]:
            if out and total + len(r.payload) > max_bytes:
                break
            out.append(r)
            total += len(r.payload)
        return out

    async def settle(self, ids: Sequence[int], fence: Any, *, retain: bool) -> int:
        self.rows = [r for r in self.rows if r.id not in set(ids)]
        return len(ids)

    async def settle_and_claim(
        self,
        settle_ids: Sequence[int],
        partition: int,
        limit: int,
        paused_like: Sequence[str],
        fence: Any,
        *,
        retain: bool,
        max_bytes: int,
        skip_topics: Sequence[str] = (),
    ) -> tuple[int, list[OutboxRow]]:
        settled = await self.settle(settle_ids, fence, retain=retain)
        claimed = await self.claim_batch(
            partition, limit, paused_like, fence, max_bytes=max_bytes, skip_topics=skip_topics
        )
        return settled, claimed


class FakeRouter:
    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None  # set: publishes wait for it
        self.availability = Availability(0.1, 1.0)

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        if self.gate is not None:
            await self.gate.wait()
        return [PUBLISHED] * len(rows)

    def sink_kind_for(self, topic: str) -> SinkKind:
        return SinkKind.KAFKA


class FakePauses:
    globally_paused = False
    like_patterns: tuple[str, ...] = ()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Waits for `condition` (checked every event-loop turn or so); fails after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


def make_worker(store: FakeStore, router: FakeRouter, budget: ByteBudget, **settings: Any) -> PartitionWorker:
    config = RelaySettings(
        claim_max_bytes=settings.pop("claim_max_bytes", 100 * KIB),
        inflight_max_bytes=budget.capacity,
        # Each batch marked done at once unless a test says otherwise (test_worker_settle covers the
        # default, where the next claim does it).
        settle_delay=settings.pop("settle_delay", 0.0),
        **settings,
    )
    ctx = WorkerContext(
        settings=config,
        store=store,  # type: ignore[arg-type]
        router=router,  # type: ignore[arg-type]
        pauses=FakePauses(),  # type: ignore[arg-type]
        policy=RetryPolicy(3, Backoff(0.1, 1.0, 2.0)),
        metrics=RelayMetrics("test"),
        lease_lost=lambda _p: None,
        budget=budget,
    )
    lease = Lease("partition:0", "me", 1, time.monotonic() + 60)
    return PartitionWorker(0, lease, ctx)


async def test_a_settled_batch_gives_every_byte_back() -> None:
    budget = ByteBudget(1000 * KIB)
    store = FakeStore([row(i, 30 * KIB) for i in range(5)])
    worker = make_worker(store, FakeRouter(), budget)

    full = await worker.process_batch()

    assert store.claims == [100 * KIB]
    assert len(store.rows) == 2, "3 rows of 30 KiB fit a 100 KiB claim"
    assert full, "a claim cut short by bytes counts as full: the worker claims again at once"
    assert budget.in_use == 0
    assert not await worker.process_batch() and budget.in_use == 0
    assert store.rows == []


async def test_an_empty_claim_holds_nothing() -> None:
    budget = ByteBudget(1000 * KIB)
    worker = make_worker(FakeStore([]), FakeRouter(), budget)
    assert not await worker.process_batch()
    assert budget.in_use == 0


async def test_a_batch_in_flight_keeps_only_what_its_rows_use_until_it_is_settled() -> None:
    budget = ByteBudget(1000 * KIB)
    store, router = FakeStore([row(1, 10 * KIB), row(2, 20 * KIB)]), FakeRouter()
    router.gate = asyncio.Event()
    worker = make_worker(store, router, budget, publish_timeout=0.05)

    assert not await worker.process_batch()  # no acknowledgement in time: the batch stays in flight
    assert budget.in_use == 30 * KIB, "the unused 70 KiB went back at once; the rows' bytes stay"
    assert not await worker.process_batch()  # still waiting: no new claim, no new bytes
    assert budget.in_use == 30 * KIB and len(store.claims) == 1

    router.gate.set()
    await worker.process_batch()
    assert budget.in_use == 0 and store.rows == []


async def test_stopping_with_a_batch_never_acknowledged_gives_its_bytes_back() -> None:
    budget = ByteBudget(1000 * KIB)
    router = FakeRouter()
    router.gate = asyncio.Event()  # never set
    worker = make_worker(FakeStore([row(1, 10 * KIB)]), router, budget, publish_timeout=0.05)
    task = asyncio.create_task(worker.run())
    await until(lambda: budget.in_use == 10 * KIB)
    worker.stop()
    await asyncio.wait_for(task, timeout=5)
    assert budget.in_use == 0


async def test_a_failed_claim_gives_the_reservation_back() -> None:
    budget = ByteBudget(1000 * KIB)
    store = FakeStore([row(1, 10 * KIB)])
    store.fail_claim = OSError("connection reset")
    worker = make_worker(store, FakeRouter(), budget)
    with pytest.raises(OSError):
        await worker.process_batch()
    assert budget.in_use == 0


async def test_a_worker_waits_for_the_budget_and_stops_while_waiting() -> None:
    budget = ByteBudget(100 * KIB)
    await budget.acquire(100 * KIB)  # someone else holds everything
    store = FakeStore([row(1, 10 * KIB)])
    worker = make_worker(store, FakeRouter(), budget)

    waiting = asyncio.create_task(worker.process_batch())
    await until(lambda: budget.waiting == 1)
    assert not waiting.done() and store.claims == [], "no claim before the bytes are granted"
    worker.stop()
    assert await asyncio.wait_for(waiting, timeout=2) is False
    assert budget.in_use == 100 * KIB and budget.waiting == 0, "the stopped worker left the line"

    budget.release(100 * KIB)
    assert budget.in_use == 0


async def test_a_worker_cancelled_while_waiting_holds_nothing() -> None:
    budget = ByteBudget(100 * KIB)
    await budget.acquire(100 * KIB)
    worker = make_worker(FakeStore([row(1, 10 * KIB)]), FakeRouter(), budget)
    waiting = asyncio.create_task(worker.process_batch())
    await until(lambda: budget.waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release(100 * KIB)
    assert budget.in_use == 0 and budget.waiting == 0, "the cancelled waiter was granted nothing"


async def test_workers_share_the_budget_and_all_finish() -> None:
    budget = ByteBudget(200 * KIB)  # room for two claims of 100 KiB at a time
    stores = [FakeStore([row(p * 100 + i, 40 * KIB) for i in range(6)]) for p in range(4)]
    workers = [make_worker(s, FakeRouter(), budget) for s in stores]
    peak = 0

    async def drain(worker: PartitionWorker) -> None:
        nonlocal peak
        while await worker.process_batch() or worker._ctx.store.rows:  # type: ignore[attr-defined]
            peak = max(peak, budget.in_use)

    await asyncio.wait_for(asyncio.gather(*(drain(w) for w in workers)), timeout=10)
    assert all(s.rows == [] for s in stores)
    assert peak <= 200 * KIB and budget.in_use == 0
