"""Coordination through Postgres only: heartbeat, renew leases, balance partitions, elect a leader.

Every `lease_ttl / 3` seconds an instance refreshes its row in relay_instances (which yields the
live instances), renews the leases it holds, gives back partitions above its fair share and takes
free or expired ones up to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from relay.leases import LEADER, Lease, partition_lease
from relay.maintenance import Maintenance
from relay.retry import SinkBackoff
from relay.store import TRANSIENT_DB_ERRORS, RelayStore
from relay.telemetry import RelayMetrics
from relay.worker import PartitionWorker, WorkerContext

log = logging.getLogger(__name__)


def fair_share(partitions: int, live: list[str], me: str) -> int:
    """Every instance computes the same split from the same sorted list: the first
    `partitions % n` instances take one partition more than the others."""
    if me not in live:
        live = sorted([*live, me])
    base, extra = divmod(partitions, len(live))
    return base + (1 if live.index(me) < extra else 0)


class Coordinator:
    def __init__(
        self,
        store: RelayStore,
        ctx: WorkerContext,
        maintenance: Maintenance,
        partitions: int,
        instance_id: str,
        ttl: float,
    ) -> None:
        self._store = store
        self._ctx = ctx
        self._maintenance = maintenance
        self._partitions = partitions
        self._instance = instance_id
        self._ttl = ttl
        self._metrics: RelayMetrics = ctx.metrics
        self._leases: dict[str, Lease] = {}
        self._workers: dict[int, tuple[PartitionWorker, asyncio.Task[None]]] = {}
        self._retiring: set[int] = set()
        self._leader_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._tick = asyncio.Event()
        self.live_instances = 1
        self._share = partitions

    # -- what others ask of us ------------------------------------------------------------------

    @property
    def held_partitions(self) -> list[int]:
        return sorted(self._workers)

    @property
    def is_leader(self) -> bool:
        return LEADER in self._leases

    def trusted_leases(self) -> list[str]:
        """The leases this instance may act on now: held, and renewed recently enough (during a
        database outage they lapse here, even though no renewal has failed outright yet)."""
        return [name for name, lease in self._leases.items() if lease.remaining() > 0]

    def wake(self, partition: int) -> None:
        entry = self._workers.get(partition)
        if entry is not None:
            entry[0].wake()

    def wake_all(self) -> None:
        for worker, _ in self._workers.values():
            worker.wake()

    def poke(self) -> None:
        """Run the next coordination round now (e.g. a lease was released somewhere)."""
        self._tick.set()

    def lease_lost(self, partition: int) -> None:
        lease = self._leases.pop(partition_lease(partition), None)
        if lease is not None:
            self._metrics.lease("lost")
            log.warning("lease lost", extra={"lease": lease.name, "fence": lease.token})
        entry = self._workers.pop(partition, None)
        if entry is not None:
            entry[0].stop()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = SinkBackoff(0.2, self._ttl / 3)
        while True:
            try:
                await self.run_once()
                if backoff.failing:
                    log.info("database reachable again")
                backoff.succeeded()
                delay = self._ttl / 3
            except TRANSIENT_DB_ERRORS as exc:
                delay = backoff.failed()
                log.warning("coordination round failed (%s); retrying in %.1fs", type(exc).__name__, delay)
            self._tick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), timeout=delay)

    async def run_once(self) -> None:
        live = await self._store.heartbeat(self._instance, self.held_partitions, self._ttl)
        self.live_instances = len(live)
        self._share = fair_share(self._partitions, live, self._instance)
        await self._renew()
        await self._balance()
        await self._elect()

    async def _renew(self) -> None:
        if not self._leases:
            return
        asked_at = time.monotonic()
        leases = list(self._leases.values())
        kept = await self._store.renew_leases(
            [lease.name for lease in leases], [lease.token for lease in leases], self._instance, self._ttl
        )
        for lease in leases:
            if lease.name in kept:
                lease.renewed(asked_at, self._ttl)
            elif lease.name == LEADER:
                self._step_down()
            else:
                self.lease_lost(int(lease.name.split(":", 1)[1]))

    async def _balance(self) -> None:
        fair = self._share
        active = [p for p in self._workers if p not in self._retiring]
        for partition in sorted(active, reverse=True)[: max(len(active) - fair, 0)]:
            self._retire(partition)
        wanted = fair - len(active)
        if wanted <= 0:
            return
        free = await self._store.claimable_partitions(self._partitions)
        random.shuffle(free)  # instances starting together should not all race for partition 0
        for partition in free:
            if wanted <= 0:
                break
            if partition in self._workers:
                continue
            if await self._acquire_partition(partition):
                wanted -= 1

    async def _acquire_partition(self, partition: int) -> bool:
        name = partition_lease(partition)
        asked_at = time.monotonic()
        token = await self._store.acquire_lease(name, self._instance, self._ttl)
        if token is None:
            self._metrics.lease("acquire_failed")
            return False
        lease = Lease.granted(name, self._instance, token, asked_at, self._ttl)
        self._leases[name] = lease
        worker = PartitionWorker(partition, lease, self._ctx)
        self._workers[partition] = (worker, asyncio.create_task(worker.run(), name=f"partition-{partition}"))
        self._metrics.lease("acquired")
        log.info("lease acquired", extra={"lease": name, "fence": token})
        return True

    def _retire(self, partition: int) -> None:
        """Give a partition back: let its batch finish, then release the lease for another instance."""
        self._retiring.add(partition)
        worker, task = self._workers[partition]
        worker.stop()
        retire = asyncio.create_task(self._release_after(partition, task))
        self._background.add(retire)
        retire.add_done_callback(self._background.discard)

    async def _release_after(self, partition: int, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self._retiring.discard(partition)
        self._workers.pop(partition, None)
        lease = self._leases.pop(partition_lease(partition), None)
        if lease is not None:
            with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                await self._store.release_leases([lease.name], [lease.token], self._instance)
            log.info("lease released", extra={"lease": lease.name, "fence": lease.token})

    async def _elect(self) -> None:
        if LEADER in self._leases:
            return
        asked_at = time.monotonic()
        token = await self._store.acquire_lease(LEADER, self._instance, self._ttl)
        if token is None:
            return
        self._leases[LEADER] = Lease.granted(LEADER, self._instance, token, asked_at, self._ttl)
        log.info("became leader", extra={"lease": LEADER, "fence": token})
        self._leader_task = asyncio.create_task(self._maintenance.run(), name="maintenance")

    def _step_down(self) -> None:
        self._leases.pop(LEADER, None)
        if self._leader_task is not None:
            self._leader_task.cancel()
            self._leader_task = None
        log.warning("leader lease lost", extra={"lease": LEADER})

    # -- shutdown ---------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, let in-flight batches settle (up to `grace`), then release every lease
        so other instances take over at once instead of after the TTL."""
        if self._leader_task is not None:
            self._leader_task.cancel()
        for worker, _ in self._workers.values():
            worker.stop()
        tasks = [task for _, task in self._workers.values()] + list(self._background)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._workers.clear()
        leases = list(self._leases.values())
        self._leases.clear()
        try:
            await self._store.release_leases(
                [x.name for x in leases], [x.token for x in leases], self._instance
            )
            await self._store.mark_stopped(self._instance)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("could not release leases on shutdown (%s); they expire after the TTL", exc)
        if leases:
            log.info("released %s leases", len(leases))
