"""The servers (embedded, or external ones from OUTBOX_BENCH_*), fresh schemas and topics, relay
fleets (devtools.fleet: real `outbox-relay run` processes) and CPU accounting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
from pydantic import SecretStr

from devtools.embedded import EmbeddedStack, StackEndpoints, external_or_embedded
from devtools.fleet import Fleet, FleetError, create_kafka_topic, delete_kafka_topic, relay_env
from relay import migrate
from relay.config import DatabaseSettings

log = logging.getLogger("bench")

ENV_PREFIX = "OUTBOX_BENCH_"
PARTITIONS = 8  # per Kafka topic

# A relay that exits or a fleet that does not balance fails the bench like any other BenchError.
BenchError = FleetError


@dataclass
class Servers:
    endpoints: StackEndpoints
    embedded: EmbeddedStack | None
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="outbox-bench-")))

    @classmethod
    def start(cls) -> Servers:
        endpoints, embedded = external_or_embedded(ENV_PREFIX)
        return cls(endpoints, embedded)

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    @property
    def db(self) -> str:
        return self.endpoints.database_url

    @property
    def kafka(self) -> str:
        return self.endpoints.kafka_bootstrap

    @property
    def redis(self) -> str:
        return self.endpoints.redis_url

    def describe(self) -> str:
        kinds = []
        for name, embedded in (
            ("Postgres", self.embedded is not None and bool(self.embedded.pids().get("postgres"))),
            ("Kafka", self.embedded is not None and bool(self.embedded.pids().get("kafka"))),
            ("Redis", self.embedded is not None and bool(self.embedded.pids().get("redis"))),
        ):
            kinds.append(f"{name}: {'embedded' if embedded else 'external'}")
        return ", ".join(kinds)


# --- Postgres ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_schema(database_url: str) -> AsyncIterator[str]:
    """A new schema `bench_<hex>` migrated to head with relay.migrate.upgrade; dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    await asyncio.to_thread(migrate.upgrade, settings)
    try:
        yield name
    finally:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'/* bench */ DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


async def is_empty(conn: asyncpg.Connection, schema: str) -> bool:
    return bool(
        await conn.fetchval(
            f'/* bench */ SELECT NOT EXISTS (SELECT 1 FROM "{schema}".outbox) AS benchprobe_empty'
        )
    )


async def pending(conn: asyncpg.Connection, schema: str) -> int:
    return int(
        await conn.fetchval(f'/* bench */ SELECT count(*) AS benchprobe_pending FROM "{schema}".outbox')
    )


async def oldest_pending_age(conn: asyncpg.Connection, schema: str) -> float:
    """Seconds since the oldest unpublished row was created (0 when none is pending)."""
    value = await conn.fetchval(
        f"/* bench */ SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS benchprobe_age"
        f' FROM "{schema}".outbox WHERE published_at IS NULL'
    )
    return float(value)


async def dead_letters(conn: asyncpg.Connection, schema: str) -> int:
    return int(
        await conn.fetchval(
            f'/* bench */ SELECT count(*) AS benchprobe_dead FROM "{schema}".dead_letter_archive'
        )
    )


async def wait_drained(
    conn: asyncpg.Connection,
    schema: str,
    timeout: float,
    relays: Fleet | None = None,
    every: float = 0.02,
) -> float:
    """Polls until the outbox is empty; returns the monotonic time it was first seen empty."""
    deadline = time.monotonic() + timeout
    while True:
        if await is_empty(conn, schema):
            return time.monotonic()
        if relays is not None:
            relays.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"outbox of {schema} not drained after {timeout:.0f}s")
        await asyncio.sleep(every)


async def server_version(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# --- Kafka and Redis --------------------------------------------------------------------------------


async def create_topic(bootstrap: str, prefix: str = "bench", partitions: int = PARTITIONS) -> str:
    """A fresh topic: Tansu slows down as a partition fills, so every measurement gets its own."""
    name = f"{prefix}.{uuid.uuid4().hex[:10]}"
    await create_kafka_topic(bootstrap, name, partitions)
    return name


async def delete_topic(bootstrap: str, name: str) -> None:
    """Frees the broker's memory (Tansu keeps everything in memory); failures are ignored."""
    if not await delete_kafka_topic(bootstrap, name):
        log.debug("could not delete topic %s", name)


# --- relay processes --------------------------------------------------------------------------------


def bench_relay_env(servers: Servers, schema: str, sink: str = "kafka", **extra: str) -> dict[str, str]:
    """The environment of an `outbox-relay run` process: defaults everywhere but what a bench sets."""
    return relay_env(
        servers.db,
        schema,
        servers.kafka,
        servers.redis,
        tuning={},
        OUTBOX_DEFAULT_SINK=sink,
        OUTBOX_LOG_LEVEL="WARNING",
        **extra,
    )


@contextlib.asynccontextmanager
async def relays(
    servers: Servers, conn: asyncpg.Connection, schema: str, count: int = 1, sink: str = "kafka", **extra: str
) -> AsyncIterator[Fleet]:
    """Started, balanced relay processes, stopped (SIGTERM) on exit."""
    fleet = Fleet(servers.db, schema, servers.logs, bench_relay_env(servers, schema, sink, **extra))
    try:
        fleet.spawn_many(count, prefix="bench")
        await fleet.wait_partitions(60, balanced=True, require_alive=True, conn=conn)
        yield fleet
    finally:
        await fleet.astop()


def relay_cpu_seconds(fleet: Fleet) -> float:
    """CPU seconds the fleet's relay processes have used so far."""
    processes = []
    for pid in fleet.pids:
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    return cpu_seconds(processes)


def postgres_processes(servers: Servers) -> list[psutil.Process]:
    """The embedded postmaster and its backends (empty for an external server)."""
    if servers.embedded is None:
        return []
    pid = servers.embedded.pids().get("postgres")
    if pid is None:
        return []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    # guest time is already part of user time in /proc/stat
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - idle, total


def machine_busy_since(start: tuple[float, float]) -> float:
    """Share of the machine's CPU capacity busy since `start` (0..1), whoever used it."""
    busy, total = machine_cpu()
    return (busy - start[0]) / (total - start[1]) if total > start[1] else float("nan")


def cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            out[process.pid] = times.user + times.system
    return out


def broker_process(servers: Servers) -> psutil.Process | None:
    """The embedded Kafka broker (Tansu); None for an external one."""
    pid = servers.embedded.pids().get("kafka") if servers.embedded is not None else None
    if pid is None:
        return None
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid)
    return None


@dataclass
class CpuTrace:
    """Cores one process used in each `step`-second window while the trace ran (empty when there is
    no process to watch, e.g. an external broker)."""

    process: psutil.Process | None
    step: float = 2.0
    windows: list[float] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CpuTrace]:
        task = asyncio.create_task(self._sample()) if self.process is not None else None
        try:
            yield self
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _sample(self) -> None:
        assert self.process is not None
        last = cpu_seconds([self.process])
        while True:
            await asyncio.sleep(self.step)
            now = cpu_seconds([self.process])
            self.windows.append((now - last) / self.step)
            last = now

    def first(self) -> float:
        return self.windows[0] if self.windows else float("nan")

    def last(self) -> float:
        return self.windows[-1] if self.windows else float("nan")


def postgres_cpu_since(servers: Servers, before: dict[int, float]) -> float:
    """CPU seconds the embedded Postgres (postmaster and every backend, new ones included) used since
    `before` (from cpu_by_pid(postgres_processes(servers))); NaN for an external server."""
    processes = postgres_processes(servers)
    if not processes:
        return float("nan")
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in cpu_by_pid(processes).items())


def own_cpu() -> float:
    """CPU seconds used by this process and every descendant (servers, relays, consumers), live or
    finished: what the rest of the machine's busy time is not."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total
