"""The relay process: explicit start/stop around the coordinator, workers, listener and sinks.

Side tasks are watched: if one dies unexpectedly the relay stops instead of limping on, and every
kind of shutdown (SIGTERM, Ctrl-C, a crashed side task) takes the same path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from relay.config import RelaySettings, SinkKind
from relay.coordinator import Coordinator
from relay.maintenance import Maintenance
from relay.migrate import head_revision
from relay.notifications import InsertListener
from relay.pauses import PauseState
from relay.retry import Backoff, RetryPolicy, SinkBackoff
from relay.sinks.base import Sink
from relay.sinks.kafka import KafkaSink
from relay.sinks.redis import RedisSink
from relay.sinks.router import Router, parse_routes
from relay.store import RelayStore
from relay.telemetry import RelayMetrics
from relay.worker import WorkerContext

log = logging.getLogger(__name__)


class SchemaBehindError(RuntimeError):
    pass


def build_sinks(settings: RelaySettings) -> dict[SinkKind, Sink]:
    sinks: dict[SinkKind, Sink] = {}
    for kind in Router.needed_sinks(settings):
        sinks[kind] = KafkaSink(settings) if kind is SinkKind.KAFKA else RedisSink(settings)
    return sinks


class RelayService:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.store = RelayStore(
            settings.database_url.get_secret_value(),
            settings.schema_name,
            pool_size=settings.pool_size,
            statement_cache_size=settings.statement_cache_size,
        )
        self.router = Router(parse_routes(settings.routes), settings.default_sink, build_sinks(settings))
        self.metrics = RelayMetrics(settings.instance_id)
        self.maintenance = Maintenance(self.store, settings)
        self.coordinator: Coordinator | None = None
        self.pauses = PauseState(self.store, on_change=self._wake_all)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self.started = False

    def _wake_all(self) -> None:
        if self.coordinator is not None:
            self.coordinator.wake_all()

    async def start(self) -> None:
        if self.started:
            return
        await self.store.open()
        await self._check_schema()
        partitions = await self.store.partition_count()
        for sink in self.router.sinks.values():
            await sink.start()
        await self.pauses.refresh()
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
            sink_backoff=SinkBackoff(0.1, self.settings.sink_backoff_max),
            lease_lost=lambda p: self.coordinator.lease_lost(p) if self.coordinator else None,
        )
        self.coordinator = Coordinator(
            self.store, ctx, self.maintenance, partitions, self.settings.instance_id, self.settings.lease_ttl
        )
        self._spawn(self.coordinator.run(), "coordinator")
        self._spawn(self.pauses.run(), "pauses")
        if self.settings.listen:
            listener = InsertListener(self.store, self.coordinator.wake, self.coordinator.wake_all)
            self._spawn(listener.run(), "listener")
        self.started = True
        log.info(
            "relay started",
            extra={
                "instance": self.settings.instance_id,
                "partitions": partitions,
                "sinks": sorted(k.value for k in self.router.sinks),
            },
        )

    async def _check_schema(self) -> None:
        current, head = await self.store.schema_revision(), head_revision()
        if current != head:
            raise SchemaBehindError(
                f"schema {self.settings.schema_name!r} is at revision {current or 'none'}, this relay needs {head}. "
                "Run `outbox-relay migrate` first (or start with `outbox-relay run --migrate`)."
            )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._side_task_done)
        self._tasks.append(task)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        log.error("%s stopped unexpectedly: %r; shutting down", task.get_name(), task.exception())
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
            coordinator_task = self._tasks[0] if self._tasks else None
            if coordinator_task is not None:
                coordinator_task.cancel()
            await self.coordinator.shutdown(self.settings.shutdown_grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sink in self.router.sinks.values():
            with contextlib.suppress(Exception):
                await sink.stop()
        await self.store.close()
        log.info("relay stopped", extra={"instance": self.settings.instance_id})


async def run_until_signalled(service: RelayService) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.start()
        await service.wait()
    finally:
        await service.stop()
