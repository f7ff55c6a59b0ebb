"""A coordination round on a slow database: the leases it wants are asked for all at once, and the
renewal of those it holds waits for nothing else in the round.

Under load one lease statement can take 100 ms and more. Asked for one after another, 16 leases made
the first round last over a second, and the first lease granted was renewed only after that round,
the round interval and the next heartbeat: past its trust window (the TTL minus 20 %), so its
worker stopped publishing, and past the TTL itself a peer takes the partition and sends its batch in
flight again. Fakes only, no servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from devtools.fleet import wait_until
from relay.availability import Availability
from relay.budget import ByteBudget
from relay.config import RelaySettings
from relay.coordinator import Coordinator
from relay.events import OutboxRow, PublishResult
from relay.maintenance import Maintenance
from relay.retry import Backoff, RetryPolicy
from relay.supervision import Supervisor
from relay.telemetry import RelayMetrics
from relay.worker import WorkerContext

PARTITIONS = 16
TTL = 3.0


class CoordinationStore:
    """Leases and instances as the coordinator sees them, with gates to hold statements open."""

    def __init__(self, peers: Sequence[str] = ()) -> None:
        self.peers = list(peers)
        # leases another instance holds; the leader's too, so no maintenance runs against the fake
        self.refused: set[str] = {"leader"}
        self.failing: dict[str, BaseException] = {}
        self.acquire_gate: asyncio.Event | None = None
        self.heartbeat_gate: asyncio.Event | None = None
        self.acquiring: set[str] = set()
        self.most_acquiring_at_once = 0
        self.granted: dict[str, int] = {}
        self.calls: list[str] = []

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> int | None:
        self.acquiring.add(name)
        self.most_acquiring_at_once = max(self.most_acquiring_at_once, len(self.acquiring))
        try:
            if name in self.failing:
                raise self.failing[name]
            token = None if name in self.refused or name in self.granted else 1
            if token is not None:
                self.granted[name] = token
            if self.acquire_gate is not None:  # the database has decided; its answer is on the way
                await self.acquire_gate.wait()
            return token
        finally:
            self.acquiring.discard(name)

    async def renew_leases(
        self, names: Sequence[str], tokens: Sequence[int], holder: str, ttl: float
    ) -> set[str]:
        self.calls.append("renew")
        return {name for name in names if name in self.granted}

    async def release_leases(self, names: Sequence[str], tokens: Sequence[int], holder: str) -> None:
        for name in names:
            self.granted.pop(name, None)

    async def claimable_partitions(self, partitions: int) -> list[int]:
        return [p for p in range(partitions) if f"partition:{p}" not in self.granted]

    async def heartbeat(
        self,
        instance_id: str,
        partitions: Sequence[int],
        liveness: float,
        unhealthy_reason: str | None = None,
    ) -> dict[str, str | None]:
        self.calls.append("heartbeat")
        if self.heartbeat_gate is not None:
            await self.heartbeat_gate.wait()
        return {name: None for name in [instance_id, *self.peers]}

    async def mark_stopped(self, instance_id: str) -> None:
        pass

    # what the partition workers ask: nothing to publish
    async def claim_batch(self, *args: Any, **kwargs: Any) -> list[OutboxRow]:
        return []


class IdleRouter:
    def __init__(self) -> None:
        self.availability = Availability(0.1, 1.0)

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        raise AssertionError("nothing is claimed, so nothing is published")


class NoPauses:
    globally_paused = False
    like_patterns: tuple[str, ...] = ()


def make_coordinator(store: CoordinationStore, ttl: float = TTL) -> Coordinator:
    settings = RelaySettings(lease_ttl=ttl)
    coordinator: Coordinator | None = None
    ctx = WorkerContext(
        settings=settings,
        store=store,  # type: ignore[arg-type]
        router=IdleRouter(),  # type: ignore[arg-type]
        pauses=NoPauses(),  # type: ignore[arg-type]
        policy=RetryPolicy(3, Backoff(0.1, 1.0, 2.0)),
        metrics=RelayMetrics("test"),
        lease_lost=lambda p: coordinator.lease_lost(p) if coordinator else None,
        budget=ByteBudget(settings.inflight_max_bytes),
    )
    supervisor = Supervisor(give_up_after=60, on_give_up=lambda _name, _exc: None)
    maintenance = Maintenance(store, settings)  # type: ignore[arg-type]
    coordinator = Coordinator(store, ctx, maintenance, PARTITIONS, "me", ttl, supervisor)  # type: ignore[arg-type]
    return coordinator


async def until(condition: Callable[[], bool], what: str) -> None:
    async def holds() -> bool:
        return condition()

    await wait_until(holds, timeout=10, interval=0.001, what=what)


def partitions_held(coordinator: Coordinator) -> int:
    return len(coordinator.held_partitions)


async def test_a_round_asks_for_every_lease_it_wants_at_once() -> None:
    store = CoordinationStore()
    store.acquire_gate = asyncio.Event()
    coordinator = make_coordinator(store)
    round_ = asyncio.create_task(coordinator.run_once())
    try:
        await until(lambda: len(store.acquiring) == PARTITIONS, "all 16 acquisitions in flight together")
        store.acquire_gate.set()
        await round_
        assert partitions_held(coordinator) == PARTITIONS
    finally:
        store.acquire_gate.set()
        await coordinator.shutdown(grace=5)


async def test_leases_others_hold_are_made_up_from_the_other_free_partitions_never_beyond_the_share() -> None:
    store = CoordinationStore(peers=["peer"])  # two live instances: a share of 8 each
    store.refused |= {f"partition:{p}" for p in (0, 1, 2, 3, 4)}
    coordinator = make_coordinator(store)
    try:
        await coordinator.run_once()
        assert partitions_held(coordinator) == 8
        assert set(coordinator.held_partitions).isdisjoint({0, 1, 2, 3, 4})
        assert store.most_acquiring_at_once <= 8, "never more leases asked for than the share"
        assert len(store.granted) == 8
    finally:
        await coordinator.shutdown(grace=5)


async def test_a_failed_acquisition_fails_the_round_and_keeps_the_leases_granted_beside_it() -> None:
    store = CoordinationStore()
    store.failing = {"partition:5": ConnectionResetError("connection lost")}
    coordinator = make_coordinator(store)
    try:
        with pytest.raises(ConnectionResetError):
            await coordinator.run_once()
        assert partitions_held(coordinator) == PARTITIONS - 1
        assert 5 not in coordinator.held_partitions
        assert sorted(coordinator.trusted_leases()) == sorted(f"partition:{p}" for p in range(16) if p != 5)
    finally:
        await coordinator.shutdown(grace=5)


async def test_the_renewal_does_not_wait_behind_a_slow_heartbeat() -> None:
    store = CoordinationStore()
    coordinator = make_coordinator(store)
    try:
        await coordinator.run_once()
        store.heartbeat_gate = asyncio.Event()
        store.calls.clear()
        asked_at = time.monotonic()
        round_ = asyncio.create_task(coordinator.run_once())
        await until(lambda: "heartbeat" in store.calls, "the second round's heartbeat")
        assert store.calls[0] == "renew", f"the renewal came first: {store.calls}"
        lease = coordinator._leases["partition:0"]
        assert lease.remaining() > TTL * 0.8 - (time.monotonic() - asked_at) - 0.01, "renewed in this round"
        store.heartbeat_gate.set()
        await round_
    finally:
        if store.heartbeat_gate is not None:
            store.heartbeat_gate.set()
        await coordinator.shutdown(grace=5)


async def test_a_stop_during_the_acquisitions_records_and_releases_what_the_database_granted() -> None:
    """Stopped while its answers are on the way, the round waits for them (at most a third of the
    TTL): a lease granted but never recorded here would stay held, its partition idle until the TTL."""
    store = CoordinationStore()
    store.acquire_gate = asyncio.Event()
    coordinator = make_coordinator(store, ttl=30.0)  # up to 10 s for the answers: room on a loaded machine
    coordinator.start()
    await until(lambda: len(store.acquiring) == PARTITIONS, "the first round's acquisitions")
    stopping = asyncio.create_task(coordinator.shutdown(grace=5))
    await asyncio.sleep(0.05)  # the stop cancels the round while the answers are still out
    assert not stopping.done()
    store.acquire_gate.set()
    await stopping
    assert store.granted == {}, "every lease granted was released on the way out"
