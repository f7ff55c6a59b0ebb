"""ProducerLanes: which producer carries a partition, and starting several producers safely."""

from __future__ import annotations

from typing import Any

import pytest

from relay.sinks.kafka_lanes import ProducerLanes


class FakeCluster:
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, _topic: str) -> set[int]:
        return self.partitions


class FakeClient:
    def __init__(self, partitions: set[int], after_refresh: set[int]) -> None:
        self.cluster = FakeCluster(partitions)
        self._after_refresh = after_refresh
        self.refreshes = 0

    async def force_metadata_update(self) -> bool:
        self.refreshes += 1
        self.cluster.partitions = self._after_refresh
        return True


class FakeProducer:
    def __init__(
        self,
        fail_start: bool = False,
        partitions: set[int] | None = None,
        after_refresh: set[int] | None = None,
    ) -> None:
        known = partitions if partitions is not None else {0, 1, 2, 3}
        self.client = FakeClient(known, after_refresh if after_refresh is not None else known)
        self.fail_start = fail_start
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True
        if self.fail_start:
            raise ConnectionError("broker down")

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return self.client.cluster.partitions_for_topic(topic)


def lanes_of(*producers: FakeProducer) -> ProducerLanes:
    return ProducerLanes(producers)  # type: ignore[arg-type]


def test_a_partition_always_rides_the_same_producer_and_every_producer_gets_partitions() -> None:
    producers = [FakeProducer() for _ in range(3)]
    lanes = lanes_of(*producers)
    chosen = {p: lanes.producer_for(p) for p in range(12)}
    assert all(lanes.producer_for(p) is chosen[p] for p in range(12))
    assert all(lanes.batches_for(p) is lanes.batches_for(p + 3) for p in range(9))
    assert {id(p) for p in chosen.values()} == {id(p) for p in producers}
    assert lanes.primary is producers[0]


def test_lanes_need_a_producer() -> None:
    with pytest.raises(ValueError):
        ProducerLanes([])


async def test_a_producer_that_fails_to_start_leaves_none_running() -> None:
    made: list[FakeProducer] = []

    def make() -> Any:
        made.append(FakeProducer(fail_start=len(made) == 2))
        return made[-1]

    with pytest.raises(ConnectionError):
        await ProducerLanes.start(4, make)
    assert len(made) == 3  # the fourth was never made
    assert all(p.started and p.stopped for p in made)


async def test_started_lanes_stop_every_producer() -> None:
    lanes = await ProducerLanes.start(3, FakeProducer)  # type: ignore[arg-type]
    assert len(lanes.producers) == 3
    await lanes.stop()
    assert all(p.stopped for p in lanes.producers)  # type: ignore[attr-defined]


async def test_a_producer_behind_on_new_partitions_refreshes_its_metadata_once() -> None:
    lagging = FakeProducer(partitions={0, 1}, after_refresh={0, 1, 2, 3})
    lanes = lanes_of(FakeProducer(), lagging)
    assert await lanes.know_partitions("t", [0, 1, 2, 3])
    assert lagging.client.refreshes == 1
    assert await lanes.know_partitions("t", [0, 1, 2, 3])
    assert lagging.client.refreshes == 1  # up to date now: no more refreshes


async def test_a_producer_still_behind_after_a_refresh_is_reported() -> None:
    lagging = FakeProducer(partitions={0, 1}, after_refresh={0, 1})
    lanes = lanes_of(FakeProducer(), lagging)
    assert not await lanes.know_partitions("t", [0, 1, 2, 3])


async def test_every_producer_is_stopped_even_when_one_fails_to() -> None:
    class FailingStop(FakeProducer):
        async def stop(self) -> None:
            await super().stop()
            raise RuntimeError("flush failed")

    producers = [FailingStop(), FakeProducer(), FakeProducer()]
    with pytest.raises(RuntimeError, match="flush failed"):
        await lanes_of(*producers).stop()
    assert all(p.stopped for p in producers)
