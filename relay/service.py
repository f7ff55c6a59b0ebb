"""The relay process: explicit start/stop around the coordinator, workers, listener and sinks.

Every loop runs under one Supervisor (relay.supervision): failures are logged, counted and retried
with backoff, database outages for as long as they last. Only a task that keeps failing for longer
than OUTBOX_SUPERVISOR_GIVE_UP stops the relay, with `failure` set, and every kind of shutdown
(SIGTERM, Ctrl-C, a give-up) takes the same path. `run_until_signalled` raises RelayFailedError
unless a signal asked for the stop, so the process never exits 0 by accident."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from typing import Protocol

from opentelemetry import metrics
from prometheus_client import CollectorRegistry

from relay.availability import Availability
from relay.budget import ByteBudget
from relay.config import RelaySettings, SinkKind
from relay.coordinator import Coordinator
from relay.health import SinkHealth
from relay.leases import LEADER
from relay.liveness import LivenessWatcher
from relay.maintenance import Maintenance
from relay.notifications import InsertListener
from relay.ops_http import OpsServer, Readiness
from relay.pauses import PauseState
from relay.retry import Backoff, FailureBackoff, RetryPolicy
from relay.schema_version import head_revision, schema_state
from relay.sinks.base import Sink
from relay.sinks.kafka import KafkaSink
from relay.sinks.redis import RedisSink
from relay.sinks.router import Router, parse_routes
from relay.store import RelayStore, is_transient_db_error
from relay.supervision import Supervisor, describe
from relay.telemetry import METER_NAME, RelayMetrics, fleet_labels, prometheus_meter_provider
from relay.tracing import configure_tracing
from relay.worker import WorkerContext

log = logging.getLogger(__name__)


class SchemaBehindError(RuntimeError):
    pass


class DatabaseUnreachableError(RuntimeError):
    pass


class RelayFailedError(RuntimeError):
    """The relay stopped because a task gave up, not because it was asked to."""


class Attached(Protocol):
    """A server that lives and dies with the relay (RelayService.attach): the control plane inside
    `outbox-relay run`, wired by outbox_relay.cli, so that relay/ never imports control/."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_sinks(settings: RelaySettings) -> dict[SinkKind, Sink]:
    sinks: dict[SinkKind, Sink] = {}
    for kind in Router.needed_sinks(settings):
        sinks[kind] = KafkaSink(settings) if kind is SinkKind.KAFKA else RedisSink(settings)
    return sinks


class RelayService:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        configure_tracing()
        self.store = RelayStore(
            settings.database_url.get_secret_value(),
            settings.schema_name,
            pool_size=settings.pool_size,
            statement_cache_size=settings.statement_cache_size,
        )
        self.router = Router(
            parse_routes(settings.routes),
            settings.default_sink,
            build_sinks(settings),
            Availability(0.1, settings.sink_backoff_max),
        )
        self.sink_health = SinkHealth(self.router, settings.sink_handover_after)
        self.registry = CollectorRegistry()
        self._meter_provider = prometheus_meter_provider(self.registry) if settings.metrics_addr else None
        meter = self._meter_provider.get_meter(METER_NAME) if self._meter_provider is not None else None
        self.metrics = RelayMetrics(
            settings.instance_id,
            meter,
            fleet_labels(settings.schema_name, settings.database_url.get_secret_value()),
        )
        self.metrics.sink_connections(lambda: {kind.value: sink for kind, sink in self.router.sinks.items()})
        self.ops: OpsServer | None = None
        self._attached: list[Attached] = []
        self._attached_started: list[Attached] = []
        self.maintenance = Maintenance(self.store, settings)
        self.coordinator: Coordinator | None = None
        self.pauses = PauseState(self.store, on_change=self._wake_all)
        self.supervisor = Supervisor(
            give_up_after=settings.supervisor_give_up, on_give_up=self._gave_up, metrics=self.metrics
        )
        self._stopped = asyncio.Event()
        self._stopping = False
        self.started = False
        self.failure: str | None = None  # why the relay stopped by itself, if it did

    def _wake_all(self) -> None:
        if self.coordinator is not None:
            self.coordinator.wake_all()

    async def start(self) -> None:
        if self.started:
            return
        if self.settings.metrics_addr:
            self.ops = OpsServer(self.settings.metrics_addr, self.registry, self.readiness)
            await self.ops.start()
        partitions = await self._open_database()
        for sink in self.router.sinks.values():
            await sink.start()
        ctx = WorkerContext(
            settings=self.settings,
            store=self.store,
            router=self.router,
            pauses=self.pauses,
            policy=RetryPolicy(
                self.settings.max_attempts,
                Backoff(
                    self.settings.backoff_initial, self.settings.backoff_max, self.settings.backoff_multiplier
                ),
            ),
            metrics=self.metrics,
            lease_lost=lambda p: self.coordinator.lease_lost(p) if self.coordinator else None,
            budget=ByteBudget(self.settings.inflight_max_bytes),
        )
        self.coordinator = Coordinator(
            self.store,
            ctx,
            self.maintenance,
            partitions,
            self.settings.instance_id,
            self.settings.lease_ttl,
            self.supervisor,
            health=self.sink_health,
        )
        self._register_gauges(partitions)
        for server in self._attached:
            self._attached_started.append(server)  # stopped even if its start fails part-way
            await server.start()
        self.coordinator.start()
        self.supervisor.run_every(
            "pauses", self.pauses.interval, self.pauses.refresh, what="reading pauses"
        ).start()
        if self.settings.listen:
            listener = InsertListener(
                self.store, self.coordinator.wake, self.coordinator.wake_all, self.metrics.database_error
            )
            self.supervisor.supervise("listener", listener.run, backoff=FailureBackoff(0.2, 10.0)).start()
        if self.settings.fast_takeover:
            watcher = LivenessWatcher(
                self.store,
                self.settings.instance_id,
                self._peers_changed,
                self.settings.fast_takeover_interval,
                self.metrics.database_error,
            )
            self.supervisor.supervise("liveness", watcher.run, backoff=FailureBackoff(0.2, 5.0)).start()
        self.started = True
        # What start-up created (modules, settings, clients, metric instruments: ~100k objects) lives
        # as long as the process; out of the collector's sight, a full collection no longer walks it
        # and stops the event loop for ~1 ms instead of ~25 ms.
        gc.collect()
        gc.freeze()
        log.info(
            "relay started",
            extra={
                "instance": self.settings.instance_id,
                "partitions": partitions,
                "sinks": sorted(k.value for k in self.router.sinks),
            },
        )

    def _peers_changed(self) -> None:
        """A peer died (its leases expired at once) or gave its leases up: take them now."""
        if self.coordinator is not None:
            self.coordinator.poke()

    @property
    def meter(self) -> metrics.Meter | None:
        """The meter behind this relay's /metrics (None without OUTBOX_METRICS_ADDR), for attached servers."""
        return self._meter_provider.get_meter(METER_NAME) if self._meter_provider is not None else None

    def attach(self, server: Attached) -> None:
        """Serve `server` beside the relay's work (before start()): it starts once the database is open,
        just before the coordinator, and stops after the workers and before the sinks."""
        if self.started:
            raise RuntimeError("attach() after start()")
        self._attached.append(server)

    def _register_gauges(self, partitions: int) -> None:
        instance = self.metrics.instance_labels

        # Leases whose trust window lapsed (e.g. the database is unreachable) are not reported as
        # held, so dashboards and OutboxNoLeader see the outage instead of frozen values.
        def trusted() -> list[str]:
            return self.coordinator.trusted_leases() if self.coordinator is not None else []

        def leader_only(values: list[tuple[float, dict[str, str]]]) -> list[tuple[float, dict[str, str]]]:
            # Fleet-wide figures come from the leader alone, so N instances do not report N copies.
            return values if LEADER in trusted() else []

        m = self.metrics
        m.gauge(
            "outbox_pending_events",
            "{event}",
            "Events waiting to be published (leader)",
            lambda: leader_only([(p, {"topic": t}) for t, p, _ in self.maintenance.gauges.backlog]),
        )
        m.gauge(
            "outbox_oldest_pending_age",
            "s",
            "Age of the oldest unpublished event (leader)",
            lambda: leader_only(
                [(a, {"topic": t}) for t, _, a in self.maintenance.gauges.backlog] or [(0.0, {"topic": ""})]
            ),
        )
        m.gauge(
            "outbox_dead_letters",
            "{event}",
            "Events in the dead-letter archive (leader)",
            lambda: leader_only([(float(self.maintenance.gauges.dead_letters), {})]),
        )
        m.gauge(
            "outbox_inbox_stale_locks",
            "{lock}",
            "Consumers' inbox claims older than OUTBOX_INBOX_LOCK_STALE_THRESHOLD, by consumer (leader)",
            lambda: leader_only([(float(n), {"consumer": c}) for c, n in self.maintenance.gauges.inbox_stale_locks]),
        )
        m.gauge(
            "outbox_paused",
            "1",
            "1 per active pause, by topic pattern ('*' = everything)",
            lambda: [(1.0, {"pattern": p}) for p in self.pauses.patterns],
        )
        m.gauge(
            "outbox_partitions",
            "{partition}",
            "Partitions of the outbox (each should be held by one instance: see outbox_partitions_held)",
            lambda: [(float(partitions), {})],
        )
        m.gauge(
            "outbox_partitions_held",
            "{partition}",
            "Partition leases this instance holds",
            lambda: [(float(sum(name != LEADER for name in trusted())), instance)],
        )
        m.gauge(
            "outbox_leader",
            "1",
            "1 when this instance holds the leader lease",
            lambda: [(1.0 if LEADER in trusted() else 0.0, instance)],
        )
        m.gauge(
            "outbox_live_instances",
            "{instance}",
            "Live relay instances seen by this one",
            lambda: [(float(self.coordinator.live_instances if self.coordinator else 0), instance)],
        )
        m.gauge(
            "outbox_instance_healthy",
            "1",
            "0 while a sink of this instance has been unavailable for longer than OUTBOX_SINK_HANDOVER_AFTER",
            lambda: [
                (0.0 if self.coordinator is not None and self.coordinator.unhealthy_reason else 1.0, instance)
            ],
        )

    async def readiness(self) -> Readiness:
        """Ready when the database answers, the schema is at head, coordination rounds succeed and
        every sink is connected and not in an outage; the failing checks say why."""
        checks = {"database": False, "schema": False}
        reasons: dict[str, str] = {}
        try:
            revision = await asyncio.wait_for(self.store.schema_revision(), timeout=2.0)
        except Exception as exc:  # any failure means not ready
            reasons["database"] = reasons["schema"] = f"not answering ({describe(exc)})"
        else:
            # Answering this probe is not enough: while coordination rounds fail (statements
            # cancelled, lock timeouts, a read-only standby) the relay cannot work either.
            coordinator = self.coordinator
            checks["database"] = coordinator is None or coordinator.healthy
            if coordinator is not None and coordinator.last_failure is not None:
                reasons["database"] = f"coordination rounds failing ({coordinator.last_failure})"
            checks["schema"] = schema_state(revision) != "behind"
            reasons["schema"] = f"at revision {revision or 'none'}, this relay needs {head_revision()}"
        outages = self.sink_health.outages()
        # The sinks that made this instance hand its partitions over to healthy peers.
        cause = (
            self.sink_health.unhealthy_sinks() if self.coordinator and self.coordinator.handed_over else {}
        )
        for kind, sink in self.router.sinks.items():
            name, outage = f"sink_{kind.value}", outages.get(kind.value)
            checks[name] = self.started and sink.is_connected() and outage is None
            cannot_connect = sink.connection.error
            if outage is not None:
                reasons[name] = outage + ("; partitions handed over" if kind.value in cause else "")
                if cannot_connect:  # why, when no retry will help
                    reasons[name] = f"cannot connect: {cannot_connect}; {reasons[name]}"
            elif not self.started:
                reasons[name] = "relay starting"
            else:
                reasons[name] = self.sink_health.not_connected_reason(sink)
        return Readiness(checks, reasons)

    async def _check_schema(self) -> None:
        current = await self.store.schema_revision()
        state = schema_state(current)
        if state == "behind":
            raise SchemaBehindError(
                f"schema {self.settings.schema_name!r} is at revision {current or 'none'}, this relay needs "
                f"{head_revision()}. Run `outbox-relay migrate` first (or start with `outbox-relay run --migrate`)."
            )
        if state == "ahead":
            # Migrations only add (expand/contract), so an older relay keeps working during a rollout.
            log.warning(
                "schema %s is at revision %s, newer than this relay knows (%s); carrying on",
                self.settings.schema_name,
                current,
                head_revision(),
            )

    async def _open_database(self) -> int:
        """Waits for the database instead of exiting: a relay started before its database (or
        during an outage, or while its statements are cancelled) should come up when it does, not
        crash-loop. Reads what starting needs: the partition count and the pauses to obey.
        Returns the partition count."""
        backoff = FailureBackoff(0.5, 10.0)
        limit = self.settings.startup_timeout
        deadline = time.monotonic() + limit if limit else float("inf")
        while True:
            try:
                await self.store.open()
                await self._check_schema()
                partitions = await self.store.partition_count()
                await self.pauses.refresh()
                return partitions
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                self.metrics.database_error(exc)
                await self.store.close()
                if time.monotonic() >= deadline:
                    raise DatabaseUnreachableError(
                        f"database not reachable within OUTBOX_STARTUP_TIMEOUT={limit:g}s: {describe(exc)}"
                    ) from None
                delay = backoff.failed()
                log.warning("database not reachable (%s); retrying in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)

    def _gave_up(self, task: str, exc: BaseException) -> None:
        self.failure = (
            f"{task} kept failing for more than OUTBOX_SUPERVISOR_GIVE_UP="
            f"{self.settings.supervisor_give_up:g}s, last with {describe(exc)}"
        )
        log.error("relay stopping: %s", self.failure)
        self.request_stop()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Idempotent. Stop claiming, settle in flight, release leases, close connections."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        if self.coordinator is not None:
            await self.coordinator.shutdown(self.settings.shutdown_grace)  # stops its own rounds first
        await self.supervisor.stop()
        for server in reversed(self._attached_started):
            await server.stop()
        for sink in self.router.sinks.values():
            with contextlib.suppress(Exception):
                await sink.stop()
        await self.store.close()
        if self.ops is not None:
            await self.ops.stop()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()  # type: ignore[attr-defined]
        log.info("relay stopped", extra={"instance": self.settings.instance_id})


async def run_until_signalled(service: RelayService) -> None:
    """Runs until SIGTERM/SIGINT; a signal during start (e.g. while waiting for the database)
    stops it too. Returns only after a signal: a relay that stopped by itself (a task gave up)
    raises RelayFailedError once stopped, so the process exits non-zero and is restarted."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(service.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        stopping.cancel()
        await service.stop()
    if service.failure is not None:
        raise RelayFailedError(service.failure)
