"""The servers (embedded, or external ones from OUTBOX_BENCH_*), fresh schemas and topics, and relay
instances run as real `outbox-relay run` processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import SecretStr

from relay import migrate
from relay.config import DatabaseSettings
from relay.embedded import EmbeddedStack, StackEndpoints, external_or_embedded

log = logging.getLogger("bench")

ENV_PREFIX = "OUTBOX_BENCH_"
PARTITIONS = 8  # per Kafka topic
RELAY_PARTITIONS = 16  # the relay's default OUTBOX_PARTITIONS


class BenchError(RuntimeError):
    pass


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
    relays: RelayFleet | None = None,
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
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def delete_topic(bootstrap: str, name: str) -> None:
    """Frees the broker's memory (Tansu keeps everything in memory); failures are ignored."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics([name])
    except Exception as exc:  # best effort
        log.debug("could not delete topic %s: %s", name, exc)
    finally:
        await admin.close()


async def count_kafka_records(bootstrap: str, topic: str, expected: int, idle: float = 3.0) -> int:
    """Reads the topic from the start and counts records (Tansu's end offsets cannot be trusted).
    Stops at `expected` or after `idle` seconds without a new record."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
        max_partition_fetch_bytes=8 * 2**20,
        fetch_max_bytes=64 * 2**20,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count, last_progress = 0, time.monotonic()
        while count < expected and time.monotonic() - last_progress < idle:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            got = sum(len(records) for records in batch.values())
            if got:
                count += got
                last_progress = time.monotonic()
        return count
    finally:
        await consumer.stop()


async def redis_stream_length(url: str, stream: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int(await client.xlen(stream))
    finally:
        await client.aclose()


async def redis_delete(url: str, *keys: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.delete(*keys)
    finally:
        await client.aclose()


# --- relay processes --------------------------------------------------------------------------------


def relay_env(servers: Servers, schema: str, sink: str = "kafka", **extra: str) -> dict[str, str]:
    """The environment of an `outbox-relay run` process: defaults everywhere but what a bench sets."""
    env = {
        "OUTBOX_DATABASE_URL": servers.db,
        "OUTBOX_SCHEMA": schema,
        "OUTBOX_DEFAULT_SINK": sink,
        "OUTBOX_LOG_LEVEL": "WARNING",
    }
    if servers.kafka:
        env["OUTBOX_KAFKA_BOOTSTRAP"] = servers.kafka
    if servers.redis:
        env["OUTBOX_REDIS_URL"] = servers.redis
    env.update(extra)
    return env


@dataclass
class RelayFleet:
    """`count` relay instances as child processes (`python -m relay run`, i.e. `outbox-relay run`)."""

    env: dict[str, str]
    logs: Path
    count: int = 1
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_paths: list[Path] = field(default_factory=list)

    def start(self) -> RelayFleet:
        run = uuid.uuid4().hex[:6]
        for index in range(self.count):
            instance = f"bench-{run}-{index}"
            path = self.logs / f"{instance}.log"
            base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
            env = {**base, **self.env, "OUTBOX_INSTANCE_ID": instance, "PYTHONUNBUFFERED": "1"}
            with path.open("ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "relay", "run"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            self.log_paths.append(path)
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check_alive(self) -> None:
        for process, path in zip(self.processes, self.log_paths, strict=True):
            if process.poll() is not None:
                tail = path.read_text(errors="replace")[-1500:] if path.exists() else ""
                raise BenchError(f"relay process {process.pid} exited with {process.returncode}:\n{tail}")

    async def wait_balanced(self, conn: asyncpg.Connection, schema: str, timeout: float = 60.0) -> float:
        """Until every instance holds its fair share of the partition leases; returns seconds waited."""
        started = time.monotonic()
        share = RELAY_PARTITIONS // self.count
        while True:
            self.check_alive()
            rows = await conn.fetch(
                f'/* bench */ SELECT holder, count(*) AS benchprobe_held FROM "{schema}".distributed_locks'
                " WHERE name LIKE 'partition:%' AND holder IS NOT NULL AND expires_at > now()"
                " GROUP BY holder"
            )
            held = [int(r["benchprobe_held"]) for r in rows]
            if len(held) == self.count and sum(held) == RELAY_PARTITIONS and min(held) >= share:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise BenchError(f"relays did not balance within {timeout:.0f}s: {held}")
            await asyncio.sleep(0.1)

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(process.pid).cpu_times()
                total += times.user + times.system
        return total

    def stop(self, timeout: float = 30.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


@contextlib.asynccontextmanager
async def relays(
    servers: Servers, conn: asyncpg.Connection, schema: str, count: int = 1, sink: str = "kafka", **extra: str
) -> AsyncIterator[RelayFleet]:
    """Started, balanced relay processes, stopped (SIGTERM) on exit."""
    fleet = RelayFleet(relay_env(servers, schema, sink, **extra), servers.logs, count).start()
    try:
        await fleet.wait_balanced(conn, schema)
        yield fleet
    finally:
        await fleet.astop()


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
