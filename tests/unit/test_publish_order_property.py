"""Per-key order under every combination of partial publish failures (property-based).

The relay's real planner, Kafka sink (shared record batches, isolation of refused batches) and
settler run round after round against a fake producer whose every record batch fails or succeeds as
hypothesis draws it. Several partition workers publish at once through the one sink, as in the
relay. Whatever the draws: per key, first deliveries follow id order, no event is settled while an
earlier event of its key is still waiting, and every event is either delivered or dead-lettered."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.events import OutboxRow, Outcome, PublishResult
from relay.retry import Backoff, RetryPolicy
from relay.worker import plan_batch, settle_plan
from tests.unit.test_kafka_batches import sink_on

BROKER_LIMIT = 1000
PARTITIONS = [0, 1]
WORKERS = 3
FAILURES = {
    "timeout": KafkaTimeoutError,
    "request_timed_out": RequestTimedOutError,
    "not_leader": NotLeaderForPartitionError,
    "corrupt": CorruptRecordException,
}


class CappedBuilder:
    """A record batch that holds at most `capacity` records, so one publish spans several batches."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes]] = []
        self.closed = False

    def append(
        self, *, timestamp: float | None, key: bytes | None, value: bytes, headers: Any
    ) -> object | None:
        if self.closed or len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


@dataclass
class ScriptedProducer:
    """Acknowledges or fails each record batch as drawn; records the log a consumer would read."""

    draw: Any
    capacity: int = 3
    healthy: bool = False
    log: list[tuple[str, int, bytes | None, bytes]] = field(default_factory=list)
    client: Any = None

    def __post_init__(self) -> None:
        self.client = SimpleNamespace(
            cluster=SimpleNamespace(
                available_partitions_for_topic=lambda _: set(PARTITIONS), topics=lambda: {"t"}
            )
        )

    async def partitions_for(self, topic: str) -> set[int]:
        return set(PARTITIONS)

    def create_batch(self) -> CappedBuilder:
        return CappedBuilder(self.capacity)

    async def send_batch(self, builder: CappedBuilder, topic: str, *, partition: int) -> asyncio.Future[None]:
        await asyncio.sleep(0)  # other workers append meanwhile
        builder.closed = True
        outcome = "ok" if self.healthy else self.draw(st.sampled_from(["ok", "ok", "ok", *FAILURES]))
        delay = self.draw(st.integers(0, 3))
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle() -> None:
            if any(len(value) > BROKER_LIMIT for _, value in builder.records):
                acknowledged.set_exception(MessageSizeTooLargeError())
            elif outcome != "ok":
                acknowledged.set_exception(FAILURES[outcome]())
            else:
                self.log.extend((topic, partition, key, value) for key, value in builder.records)
                acknowledged.set_result(None)

        _later(delay, settle)
        return acknowledged


def _later(hops: int, fn: Any) -> None:
    loop = asyncio.get_running_loop()
    if hops == 0:
        loop.call_soon(fn)
    else:
        loop.call_soon(_later, hops - 1, fn)


@st.composite
def outboxes(draw: Any) -> list[OutboxRow]:
    count = draw(st.integers(1, 40))
    rows = []
    for n in range(1, count + 1):
        key = draw(st.sampled_from(["a", "b", "c", "d", "e", None]))
        big = draw(st.integers(0, 12)) == 0
        payload = (b"X" * (BROKER_LIMIT + 1)) if big else f"{n}".encode()
        rows.append(OutboxRow(n, uuid.uuid4(), "t", key, payload, {}, datetime.now(UTC), 0))
    return rows


def worker_of(row: OutboxRow) -> int:
    """Partition workers own disjoint keys, as relay partitions do."""
    return zlib.crc32((row.key or str(row.id)).encode()) % WORKERS


async def one_round(sink: Any, outbox: dict[int, OutboxRow], policy: RetryPolicy) -> dict[int, str]:
    """Every worker claims its rows (id order), publishes, settles. Returns id -> what happened."""
    claims: dict[int, list[OutboxRow]] = defaultdict(list)
    for row_id in sorted(outbox):
        claims[worker_of(outbox[row_id])].append(outbox[row_id])
    plans = {w: plan_batch(rows, max_payload_bytes=10_000) for w, rows in claims.items()}
    answers = await asyncio.gather(*(sink.publish(plan.send) for plan in plans.values()))
    happened: dict[int, str] = {}
    for plan, results in zip(plans.values(), answers, strict=True):
        settlement = settle_plan(plan.send, results, policy)
        assert not settlement.out_of_order, f"accepted behind a failed event: {[(r.id, x.outcome.value, r.attempts) for r, x in zip(plan.send, results, strict=True)]}"
        for row in settlement.published:
            happened[row.id] = "published"
        for row, _, _ in settlement.retry:
            happened[row.id] = "retry"
        for row, _, _ in settlement.dead:
            happened[row.id] = "dead"
    return happened


def apply(outbox: dict[int, OutboxRow], happened: dict[int, str], dead: set[int]) -> None:
    for row_id, what in happened.items():
        if what == "retry":
            outbox[row_id] = replace(outbox[row_id], attempts=outbox[row_id].attempts + 1)
        elif what == "dead":
            del outbox[row_id]
            dead.add(row_id)
    for row_id in (row_id for row_id, what in happened.items() if what == "published"):
        row = outbox.pop(row_id)
        earlier = [r.id for r in outbox.values() if row.key is not None and r.key == row.key and r.id < row.id]
        assert not earlier, f"{row_id} settled while {earlier[0]} of its key still waits"


async def relay_until_drained(rows: list[OutboxRow], draw: Any) -> tuple[ScriptedProducer, set[int]]:
    producer = ScriptedProducer(draw, capacity=draw(st.integers(1, 6)))
    sink = sink_on(producer)  # type: ignore[arg-type]
    policy = RetryPolicy(1000, Backoff(0.0, 0.0))
    outbox = {row.id: row for row in rows}
    dead: set[int] = set()
    for round_number in range(200):
        if not outbox:
            break
        producer.healthy = round_number >= 8  # failures first, then the broker recovers
        apply(outbox, await one_round(sink, outbox, policy), dead)
    assert not outbox, f"never published: {sorted(outbox)}"
    return producer, dead


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=outboxes(), data=st.data())
def test_per_key_order_survives_any_mix_of_batch_failures(rows: list[OutboxRow], data: Any) -> None:
    producer, dead = asyncio.run(relay_until_drained(rows, data.draw))
    by_value = {row.payload: row for row in rows}
    first_seen: dict[int, int] = {}
    for position, (_, _, _, value) in enumerate(producer.log):
        first_seen.setdefault(by_value[value].id, position)
    big = {row.id for row in rows if len(row.payload) > BROKER_LIMIT}
    assert big <= dead, "a record the broker refuses is archived"
    assert set(first_seen) | dead == {row.id for row in rows}, "every event delivered or archived"
    for key in {row.key for row in rows if row.key is not None}:
        ids = [row.id for row in rows if row.key == key and row.id in first_seen]
        order = sorted(ids, key=lambda row_id: first_seen[row_id])
        assert order == ids, f"key {key}: first deliveries {order}, ids {ids}"


def test_a_failed_batch_defers_the_batch_queued_behind_it() -> None:
    """The case that broke order before batches were chained: batch 1 of a partition times out
    while batch 2, holding a later event of the same key, is acknowledged."""
    script = iter(["timeout", "ok"])

    def draw(strategy: Any) -> Any:
        return next(script) if "sampled_from" in repr(strategy) else 0

    async def scenario() -> tuple[list[PublishResult], ScriptedProducer]:
        producer = ScriptedProducer(draw, capacity=1)
        sink = sink_on(producer)  # type: ignore[arg-type]
        first = OutboxRow(1, uuid.uuid4(), "t", "k", b"1", {}, datetime.now(UTC), 0)
        second = replace(first, id=2, message_id=uuid.uuid4(), payload=b"2")
        return await sink.publish([first, second]), producer

    results, producer = asyncio.run(scenario())
    assert producer.log == [], "nothing may land behind the failed batch"
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE, Outcome.DEFERRED]
