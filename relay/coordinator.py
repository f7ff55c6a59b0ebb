"""Coordination through Postgres only: heartbeat, renew leases, balance partitions, elect a leader.

Every `lease_ttl / 3` seconds an instance renews the leases it holds, refreshes its row in
relay_instances (which yields the live instances), gives back partitions above its fair share and
takes free or expired ones up to it, asking for them all at once.

The rounds run as a supervised ticker (relay.supervision): a failed round (the database away, a
statement cancelled or timed out on a lock) is retried with backoff and never ends the relay. The
leader's maintenance is a second ticker, started on election and stopped on stepping down. A
partition worker that ends without being asked to gives its lease back, to be taken again on the
next round, so a partition never stays wedged behind a lease this instance keeps renewing.

Health (relay.health): the heartbeat also records whether this instance's own sinks work. While a
sink has been unavailable for longer than OUTBOX_SINK_HANDOVER_AFTER the instance is unhealthy, and
as long as one live peer is healthy its fair share is 0: it retires its partitions (releasing the
leases, so the healthy peers take them on their next round) and probes its down sinks every round
until they answer; then it is healthy again and gets partitions back through the normal balance.
When no live instance is healthy (everyone lost the broker: a real outage) the split is the usual
one over all live instances, so no partition is ever left without an owner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Collection, Sequence

from relay.health import SinkHealth
from relay.leases import LEADER, Lease, partition_lease
from relay.maintenance import Maintenance
from relay.retry import FailureBackoff
from relay.store import RelayStore, is_transient_db_error
from relay.supervision import Supervisor, describe
from relay.telemetry import RelayMetrics
from relay.worker import PartitionWorker, WorkerContext

log = logging.getLogger(__name__)


def fair_share(partitions: int, live: Sequence[str], me: str, unhealthy: Collection[str] = ()) -> int:
    """Every instance computes the same split from the same sorted list: the first
    `partitions % n` instances take one partition more than the others.

    Only the healthy instances count while at least one live instance is healthy: an unhealthy one
    (its own sink down, see relay.health) then gets 0, and its partitions go to the healthy ones.
    When none is healthy (a shared outage) the split is over all live instances, as if all were
    healthy, so that no partition is orphaned. `me` counts as live even when missing from `live`."""
    everyone = sorted({*live, me})
    healthy = [instance for instance in everyone if instance not in unhealthy]
    counted = healthy or everyone
    if me not in counted:
        return 0
    base, extra = divmod(partitions, len(counted))
    return base + (1 if counted.index(me) < extra else 0)


class Coordinator:
    def __init__(
        self,
        store: RelayStore,
        ctx: WorkerContext,
        maintenance: Maintenance,
        partitions: int,
        instance_id: str,
        ttl: float,
        supervisor: Supervisor,
        health: SinkHealth | None = None,
    ) -> None:
        self._store = store
        self._health = health
        self._ctx = ctx
        self._partitions = partitions
        self._instance = instance_id
        self._ttl = ttl
        self._metrics: RelayMetrics = ctx.metrics
        self._leases: dict[str, Lease] = {}
        self._workers: dict[int, tuple[PartitionWorker, asyncio.Task[None]]] = {}
        self._retiring: set[int] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self.live_instances = 1
        self._share = partitions
        self.unhealthy_reason: str | None = None  # as reported in the last heartbeat
        self.healthy_peers = 0  # live peers whose last heartbeat reported them healthy
        self._probing: asyncio.Task[None] | None = None
        self.last_failure: str | None = None  # why the last round failed; None once one succeeds
        self._database_down = False  # the last round failed with a transient database error
        self._rounds = supervisor.run_every(
            "coordinator",
            ttl / 3,
            self.round,
            backoff=FailureBackoff(0.2, ttl / 3),
            what="coordination round",
        )
        self._maintenance = supervisor.run_every(
            "maintenance", maintenance.interval, maintenance.run_once, what="maintenance round"
        )

    # -- what others ask of us ------------------------------------------------------------------

    @property
    def held_partitions(self) -> list[int]:
        return sorted(self._workers)

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

    @property
    def healthy(self) -> bool:
        """Whether the last coordination round succeeded (for /readyz)."""
        return self.last_failure is None

    @property
    def handed_over(self) -> bool:
        """Unhealthy while a peer is healthy: this instance's share is 0, its partitions go (or went)
        to the healthy peers."""
        return self.unhealthy_reason is not None and self.healthy_peers > 0

    def poke(self) -> None:
        """Run the next coordination round now (e.g. a lease was released somewhere)."""
        self._rounds.poke()

    def lease_lost(self, partition: int) -> None:
        lease = self._leases.pop(partition_lease(partition), None)
        if lease is not None:
            self._metrics.lease("lost")
            log.warning("lease lost", extra={"lease": lease.name, "fence": lease.token})
        entry = self._workers.pop(partition, None)
        if entry is not None:
            entry[0].stop()

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the coordination rounds (idempotent); `shutdown` stops them."""
        self._rounds.start()

    async def round(self) -> None:
        """One supervised round: its failure is logged and retried by the ticker."""
        try:
            await self.run_once()
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.last_failure = describe(exc)
                self._database_down = is_transient_db_error(exc)
            raise
        if self._database_down:
            log.info("database reachable again")
        self.last_failure, self._database_down = None, False

    async def run_once(self) -> None:
        # Renewal first: rounds start an interval apart (relay.supervision), so one renewal follows
        # the last by about that interval, whatever the heartbeat and acquisitions cost on a busy database.
        await self._renew()
        reason = self._health.unhealthy_reason() if self._health is not None else None
        live = await self._store.heartbeat(self._instance, self.held_partitions, self._ttl, reason)
        live.setdefault(self._instance, reason)
        unhealthy = {instance for instance, why in live.items() if why is not None}
        self.live_instances = len(live)
        self._share = fair_share(self._partitions, list(live), self._instance, unhealthy)
        self._health_changed(reason, [i for i in live if i != self._instance and i not in unhealthy])
        await self._balance()
        await self._elect()
        if self.unhealthy_reason is not None and not self._workers:
            self._start_probe()  # nothing published here any more to learn that the sink is back

    def _health_changed(self, reason: str | None, healthy_peers: list[str]) -> None:
        """Logs the transitions: handing over, keeping the partitions in a shared outage, healthy again."""
        was_reason, was_handed_over = self.unhealthy_reason, self.handed_over
        self.unhealthy_reason, self.healthy_peers = reason, len(healthy_peers)
        if self.handed_over and not was_handed_over:
            active = len([p for p in self._workers if p not in self._retiring])
            log.warning(
                "%s while %s peers are healthy: handing over %s partitions",
                reason,
                len(healthy_peers),
                active,
                extra={"peers": healthy_peers},
            )
        elif reason is not None and not self.handed_over and (was_reason is None or was_handed_over):
            log.warning("%s, but no live peer is healthy (a shared outage): keeping the partitions", reason)
        elif reason is None and was_reason is not None:
            log.info("sinks available again: healthy, taking partitions again (was: %s)", was_reason)

    def _start_probe(self) -> None:
        """Probes the down sinks in the background (a probe may take long; rounds must not wait
        for it), at most one at a time; a sink that answers makes the next round come at once."""
        if self._health is None or (self._probing is not None and not self._probing.done()):
            return
        self._probing = asyncio.create_task(self._probe(self._health), name="sink-probe")

    async def _probe(self, health: SinkHealth) -> None:
        try:
            recovered = await asyncio.wait_for(health.probe(), timeout=max(self._ttl, 1.0))
        except Exception as exc:  # a failed or slow probe means: still down; the next round asks again
            log.debug("sink probe failed: %s", describe(exc))
            return
        if recovered:
            self.poke()

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
                await self._step_down()
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
        candidates = [partition for partition in free if partition not in self._workers]
        while wanted > 0 and candidates:
            attempt, candidates = candidates[:wanted], candidates[wanted:]
            wanted -= await self._acquire_partitions(attempt)

    async def _acquire_partitions(self, partitions: list[int]) -> int:
        """Asks for the leases all at once, so the first one granted is not left waiting for its
        renewal (next round) behind one round trip per lease on a slow database: the round that
        acquires them takes as long as one acquisition. Returns how many were granted; a failed
        acquisition is raised once every other has been answered (the granted ones are kept)."""
        acquiring = [asyncio.ensure_future(self._acquire_partition(partition)) for partition in partitions]
        try:
            await asyncio.wait(acquiring)  # unlike gather, a cancellation here leaves them running
        except asyncio.CancelledError:
            await self._finish_acquiring(acquiring)
            raise
        failures = [exc for exc in (task.exception() for task in acquiring) if exc is not None]
        if failures:
            raise failures[0]
        return sum(1 for task in acquiring if task.result())

    async def _finish_acquiring(self, acquiring: list[asyncio.Task[bool]]) -> None:
        """Stopping: the answers on the way are still recorded (for a third of the TTL at most), so
        that shutdown releases a lease the database granted instead of leaving its partition idle
        until the lease expires."""
        try:
            await asyncio.wait(acquiring, timeout=self._ttl / 3)
        finally:
            for task in acquiring:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: the stop is what gets reported

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
        task = asyncio.create_task(worker.run(), name=f"partition-{partition}")
        self._workers[partition] = (worker, task)
        task.add_done_callback(lambda done: self._worker_ended(partition, worker, done))
        self._metrics.lease("acquired")
        log.info("lease acquired", extra={"lease": name, "fence": token})
        return True

    def _worker_ended(self, partition: int, worker: PartitionWorker, task: asyncio.Task[None]) -> None:
        """A worker ends when retired, when its lease is lost or on shutdown. Ending any other way
        (a bug) must not leave its partition idle behind a lease we keep renewing: give the lease
        back, so the next round (here or on another instance) starts a fresh worker."""
        entry = self._workers.get(partition)
        if self._closing or entry is None or entry[0] is not worker or partition in self._retiring:
            return
        exc = None if task.cancelled() else task.exception()
        log.error(
            "partition %s: worker ended unexpectedly (%s); giving its lease back",
            partition,
            describe(exc) if exc is not None else "cancelled" if task.cancelled() else "returned",
            exc_info=exc,
        )
        self._metrics.task_restarted("partition")
        self._retire(partition)

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
            try:
                await self._store.release_leases([lease.name], [lease.token], self._instance)
            except Exception as exc:  # the lease expires after the TTL anyway
                log.warning("could not release %s (%s); it expires after the TTL", lease.name, describe(exc))
                return
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
        self._maintenance.start()

    async def _step_down(self) -> None:
        self._leases.pop(LEADER, None)
        log.warning("leader lease lost", extra={"lease": LEADER})
        await self._maintenance.stop()

    # -- shutdown ---------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, let in-flight batches settle (up to `grace`), then release every lease
        so other instances take over at once instead of after the TTL. Idempotent."""
        self._closing = True
        await self._rounds.stop()
        await self._maintenance.stop()
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
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
        except Exception as exc:  # whatever the cause, the leases expire after the TTL anyway
            log.warning("could not release leases on shutdown (%s); they expire after the TTL", describe(exc))
        if leases:
            log.info("released %s leases", len(leases))
