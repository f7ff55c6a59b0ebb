"""The partition worker and the router under sink faults, with fakes (no servers): a publish that
raises after the worker stopped waiting cannot wedge the partition; an unavailable topic is left out
of the next claims instead of pausing the worker; dead-letter copies never hold up a worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from relay.availability import Availability
from relay.budget import ByteBudget
from relay.config import SinkKind
from relay.events import PUBLISHED, OutboxRow, Outcome, PublishResult
from relay.sinks.router import Router
from relay.worker import PublishCrashedError
from tests.unit.test_worker_budget import KIB, FakeRouter, FakeStore, make_worker


def event(n: int, topic: str, key: str | None = None) -> OutboxRow:
    return OutboxRow(n, uuid.uuid4(), topic, key, b"{}", {}, datetime.now(UTC), 0)


class SkippingStore(FakeStore):
    """Honours skip_topics as the claim statement does, and remembers what it was asked to skip."""

    def __init__(self, rows: list[OutboxRow]) -> None:
        super().__init__(rows)
        self.skipped: list[tuple[str, ...]] = []

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
        self.skipped.append(tuple(skip_topics))
        rows = [r for r in self.rows if r.topic not in skip_topics]
        return rows[:limit]


class TopicDownRouter(FakeRouter):
    def __init__(self, down: str) -> None:
        super().__init__()
        self.down = down
        self.sent: list[int] = []

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        results = []
        for row in rows:
            if row.topic == self.down:
                results.append(PublishResult(Outcome.UNAVAILABLE, "not_authorized", "ACL", topic_scoped=True))
                self.availability.unavailable("kafka", row.topic, "not_authorized", topic_scoped=True)
            else:
                self.sent.append(row.id)
                results.append(PUBLISHED)
        return results


async def test_an_unavailable_topic_is_skipped_by_the_next_claims_and_costs_no_pause() -> None:
    rows = [event(n, "down" if n % 2 else "up", key=f"k{n % 4}") for n in range(1, 41)]
    store = SkippingStore(rows)
    router = TopicDownRouter("down")
    worker = make_worker(store, router, ByteBudget(1000 * KIB))

    started = time.monotonic()
    await worker.process_batch()
    await worker.process_batch()
    assert time.monotonic() - started < 0.5, "an outage must not put the worker to sleep"

    assert store.skipped == [(), ("down",)]
    assert sorted(router.sent) == [n for n in range(1, 41) if n % 2 == 0]
    assert {r.topic for r in store.rows} == {"down"}, "the unavailable topic's events wait, untouched"
    assert all(r.attempts == 0 for r in store.rows)


async def test_a_publish_that_fails_after_the_worker_stopped_waiting_does_not_wedge_the_partition() -> None:
    store = FakeStore([event(1, "orders"), event(2, "orders")])
    router = FakeRouter()
    release = asyncio.Event()
    calls = 0

    async def publish(rows: Sequence[OutboxRow]) -> list[PublishResult]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            raise RuntimeError("the sink was torn down under the publish")
        return [PUBLISHED] * len(rows)

    router.publish = publish  # type: ignore[method-assign]
    worker = make_worker(store, router, ByteBudget(1000 * KIB), publish_timeout=0.05)

    assert await worker.process_batch() is False, "no acknowledgement yet: the batch stays in flight"
    assert worker._inflight is not None
    release.set()
    await asyncio.sleep(0)
    with pytest.raises(PublishCrashedError):
        await worker.process_batch()
    assert worker._inflight is None, "the failed publish is forgotten, not awaited forever"

    await worker.process_batch()
    assert store.rows == [], "the next round claims the same events again and publishes them"


async def test_a_publish_that_raises_a_timeout_of_its_own_is_a_crashed_publish_naming_it() -> None:
    # Not "no acknowledgement yet": the publish ended, with an error the operator must see as is.
    store = FakeStore([event(1, "orders")])
    router = FakeRouter()
    calls = 0

    async def publish(rows: Sequence[OutboxRow]) -> list[PublishResult]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("an inner wait of the sink gave up")
        return [PUBLISHED] * len(rows)

    router.publish = publish  # type: ignore[method-assign]
    worker = make_worker(store, router, ByteBudget(1000 * KIB), publish_timeout=5.0)

    with pytest.raises(PublishCrashedError) as crashed:
        await worker.process_batch()
    assert isinstance(crashed.value.__cause__, TimeoutError)
    assert "an inner wait of the sink gave up" in str(crashed.value)
    assert worker._inflight is None
    await worker.process_batch()
    assert store.rows == [], "the event stays in the outbox and goes with the next claim"


async def test_stopping_the_worker_mid_publish_leaves_the_publish_running() -> None:
    # The broker may still take the batch; cancelling its send would only hide what it did.
    store = FakeStore([event(1, "orders")])
    router = FakeRouter()
    release, started = asyncio.Event(), asyncio.Event()
    running: list[asyncio.Task[Any]] = []

    async def publish(rows: Sequence[OutboxRow]) -> list[PublishResult]:
        current = asyncio.current_task()
        assert current is not None
        running.append(current)
        started.set()
        await release.wait()
        return [PUBLISHED] * len(rows)

    router.publish = publish  # type: ignore[method-assign]
    worker = make_worker(store, router, ByteBudget(1000 * KIB), publish_timeout=30.0)
    batch = asyncio.create_task(worker.process_batch())
    await started.wait()
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert not running[0].done(), "the publish itself was not cancelled with the worker"
    release.set()
    assert await running[0] == [PUBLISHED]


class HangingSink:
    name = "kafka"

    def __init__(self) -> None:
        self.copies: list[str] = []
        self.release = asyncio.Event()

    async def publish_dead_letters(self, letters: Sequence[tuple[OutboxRow, str]]) -> None:
        await self.release.wait()
        self.copies.extend(reason for _, reason in letters)


async def test_dead_letter_copies_are_sent_in_the_background() -> None:
    sink = HangingSink()
    router = Router([], SinkKind.KAFKA, {SinkKind.KAFKA: sink}, Availability())  # type: ignore[dict-item]
    router.copy_dead_letters([(event(1, "orders"), "record_too_large"), (event(2, "orders"), "max_attempts")])
    assert sink.copies == [], "copying returns at once, before the broker answers"
    sink.release.set()
    await router.stop()
    assert sink.copies == ["record_too_large", "max_attempts"], "one batch per sink, in order"
