"""PartitionWorker marks an acknowledged batch that left nothing waiting done in the same statement
as the partition's next claim (OUTBOX_SETTLE_DELAY): one round trip per batch instead of two. A full
batch (more is waiting) is marked done at once, on its own: the claim straight after it would
otherwise have to pass over every row it settles. What must hold: a claim never returns a row it is
settling; nothing is published while an earlier batch is still unsettled, so a crash can repeat at
most one batch per partition; a quiet partition, a stop, a pause and a lost lease each settle or
give up correctly. Fakes only (the statement itself: tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from relay.budget import ByteBudget
from relay.events import PUBLISHED, OutboxRow, PublishResult
from tests.unit.test_worker_budget import KIB, FakeRouter, FakeStore, make_worker, row, until


class RecordingStore(FakeStore):
    """Keeps every call in order: ("claim", None), ("settle", ids) or ("settle+claim", ids)."""

    def __init__(self, rows: list[OutboxRow]) -> None:
        super().__init__(rows)
        self.calls: list[tuple[str, tuple[int, ...] | None]] = []
        self.lose_lease = False

    async def claim_batch(self, *args: Any, **kwargs: Any) -> list[OutboxRow]:
        self.calls.append(("claim", None))
        return await super().claim_batch(*args, **kwargs)

    async def settle(self, ids: Sequence[int], fence: Any, *, retain: bool) -> int:
        self.calls.append(("settle", tuple(ids)))
        return await self._settle(ids)

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
        self.calls.append(("settle+claim", tuple(settle_ids)))
        if self.lose_lease:  # the fence refuses both parts
            return 0, []
        settled = await self._settle(settle_ids)
        claimed = await FakeStore.claim_batch(
            self, partition, limit, paused_like, fence, max_bytes=max_bytes, skip_topics=skip_topics
        )
        assert not {r.id for r in claimed} & set(settle_ids), "a claim returned a row it was settling"
        return settled, claimed

    async def _settle(self, ids: Sequence[int]) -> int:
        before = len(self.rows)
        self.rows = [r for r in self.rows if r.id not in set(ids)]
        return before - len(self.rows)


class CountingRouter(FakeRouter):
    def __init__(self, store: RecordingStore) -> None:
        super().__init__()
        self.store = store
        self.sent: list[int] = []
        self.unsettled_at_publish: list[int] = []

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        published = set(self.sent)
        self.unsettled_at_publish.append(sum(1 for r in self.store.rows if r.id in published))
        self.sent.extend(r.id for r in rows)
        return await super().publish(rows)


def setup(rows: int, **settings: Any) -> tuple[RecordingStore, CountingRouter, Any]:
    store = RecordingStore([row(n, 10) for n in range(1, rows + 1)])
    router = CountingRouter(store)
    settings.setdefault("settle_delay", 0.05)
    worker = make_worker(store, router, ByteBudget(1000 * KIB), **settings)
    return store, router, worker


async def test_the_next_claim_settles_the_batch_before_it_in_the_same_statement() -> None:
    store, router, worker = setup(1, batch_size=10)

    assert not await worker.process_batch()  # row 1 published; not yet marked done
    assert store.calls == [("claim", None)]
    assert [r.id for r in store.rows] == [1]

    store.rows.append(row(2, 10))  # committed meanwhile
    assert not await worker.process_batch()
    assert store.calls[-1] == ("settle+claim", (1,))
    assert [r.id for r in store.rows] == [2]

    assert not await worker.process_batch()  # nothing left to claim; row 2 settled on the way
    assert store.rows == [] and router.sent == [1, 2]
    assert [name for name, _ in store.calls] == ["claim", "settle+claim", "settle+claim"]


async def test_a_full_batch_is_settled_at_once_on_its_own() -> None:
    """More is waiting: the next claim comes straight away, and folding the settle into it would make
    Postgres pass over every row being settled (they are still visible to the claim's snapshot)."""
    store, router, worker = setup(5, batch_size=2)

    assert await worker.process_batch()
    assert store.calls == [("claim", None), ("settle", (1, 2))]
    assert [r.id for r in store.rows] == [3, 4, 5]

    assert await worker.process_batch()
    assert store.calls[-2:] == [("claim", None), ("settle", (3, 4))]

    assert not await worker.process_batch()  # row 5 alone: not full, left for the next claim
    assert [r.id for r in store.rows] == [5] and router.sent == [1, 2, 3, 4, 5]
    assert not await worker.process_batch()
    assert store.rows == [] and store.calls[-1] == ("settle+claim", (5,))


async def test_nothing_is_published_while_an_earlier_batch_is_unsettled() -> None:
    """The copies a crash can cause stay bounded by one batch per partition."""
    _, router, worker = setup(9, batch_size=2)
    while await worker.process_batch():
        pass
    assert router.sent == list(range(1, 10))
    assert router.unsettled_at_publish == [0] * 5


async def test_a_quiet_partition_settles_when_the_delay_is_over_not_at_the_next_poll() -> None:
    store, router, worker = setup(1, settle_delay=0.05, poll_interval=60.0)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: router.sent == [1])
        await until(lambda: store.rows == [], timeout=5.0)  # a 60 s poll would never get there
        assert store.calls[-1] == ("settle+claim", (1,))
    finally:
        worker.stop()
        await running


async def test_a_stop_settles_what_was_published() -> None:
    store, router, worker = setup(2, settle_delay=1.0, poll_interval=60.0)
    running = asyncio.create_task(worker.run())
    await until(lambda: router.sent == [1, 2])
    assert [r.id for r in store.rows] == [1, 2]
    worker.stop()
    await asyncio.wait_for(running, 5)
    assert store.rows == [] and store.calls[-1] == ("settle", (1, 2))


async def test_a_paused_worker_still_settles_what_it_published() -> None:
    store, _, worker = setup(1, settle_delay=0.01, poll_interval=60.0)
    assert not await worker.process_batch()
    worker._ctx.pauses.globally_paused = True  # type: ignore[misc]
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: store.rows == [])
        assert store.calls[-1] == ("settle", (1,))
    finally:
        worker.stop()
        await running


async def test_a_lease_lost_at_the_combined_statement_publishes_nothing_more() -> None:
    store, router, worker = setup(2, batch_size=10)
    lost: list[int] = []
    worker._ctx.lease_lost = lost.append
    assert not await worker.process_batch()
    store.rows += [row(3, 10), row(4, 10)]
    store.lose_lease = True
    assert not await worker.process_batch()
    assert router.sent == [1, 2], "rows claimed under a lost lease are not published"
    assert lost == [0]
    assert not worker._unsettled, "the new owner sends them again; this worker forgets them"


async def test_a_failed_statement_keeps_the_batch_to_settle_with_the_next_one() -> None:
    store, router, worker = setup(2, batch_size=10)
    assert not await worker.process_batch()
    store.rows.append(row(3, 10))
    calls = len(store.calls)
    original = store.settle_and_claim

    async def broken(*args: Any, **kwargs: Any) -> Any:
        store.calls.append(("settle+claim", tuple(args[0])))
        raise ConnectionResetError("the database went away")

    store.settle_and_claim = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        await worker.process_batch()
    store.settle_and_claim = original  # type: ignore[method-assign]
    assert [r.id for r in store.rows] == [1, 2, 3]
    assert not await worker.process_batch()
    assert store.calls[calls + 1] == ("settle+claim", (1, 2))
    assert router.sent == [1, 2, 3]


async def test_rows_that_fail_are_recorded_at_once_and_not_settled() -> None:
    store, router, worker = setup(2, batch_size=3)
    failures: list[tuple[int, ...]] = []

    async def record_failures(ids: Sequence[int], *_: Any) -> int:
        failures.append(tuple(ids))
        return len(ids)

    store.record_failures = record_failures  # type: ignore[attr-defined]

    async def publish(rows: Sequence[OutboxRow]) -> list[PublishResult]:
        from relay.events import Outcome

        router.sent.extend(r.id for r in rows)
        return [PUBLISHED, PublishResult(Outcome.RETRY, "broker_error", "boom")]

    router.publish = publish  # type: ignore[method-assign]
    await worker.process_batch()
    assert failures == [(2,)], "a retry is written before the next claim, which must see it"
    assert worker._unsettled and [r.id for r in worker._unsettled] == [1]
