"""Test harness: real `outbox-relay run` processes, writers committing real transactions, and
consumers reading back what reached Kafka and Redis Streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clients.writer import OutboxEvent, aenqueue_many

RELAY_BIN = str(Path(sys.executable).with_name("outbox-relay"))


@dataclass
class RelayProcess:
    """One relay instance as a child process (so it can be killed, frozen and thawed)."""

    instance_id: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        env = {**os.environ, **self.env, "OUTBOX_INSTANCE_ID": self.instance_id}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([RELAY_BIN, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Fleet:
    database_url: str
    schema: str
    tmp: Path
    base_env: dict[str, str]
    relays: list[RelayProcess] = field(default_factory=list)

    def spawn(self, instance_id: str, **env: str) -> RelayProcess:
        relay = RelayProcess(instance_id, {**self.base_env, **env}, self.tmp / f"{instance_id}.log").start()
        self.relays.append(relay)
        return relay

    def stop_all(self) -> None:
        for relay in self.relays:
            relay.stop()


def relay_env(database_url: str, schema: str, kafka: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_SCHEMA": schema,
        "OUTBOX_KAFKA_BOOTSTRAP": kafka,
        "OUTBOX_REDIS_URL": redis_url,
        "OUTBOX_LEASE_TTL": "3",
        "OUTBOX_POLL_INTERVAL": "0.5",
        "OUTBOX_BATCH_SIZE": "200",
        "OUTBOX_SHUTDOWN_GRACE": "10",
        "OUTBOX_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Written:
    id: int
    message_id: str
    topic: str
    key: str


async def write_events(
    database_url: str,
    schema: str,
    topics: list[str],
    total: int,
    keys: int = 1000,
    writers: int = 4,
    per_txn: int = 10,
    pace: float = 0.0,
) -> list[Written]:
    """`writers` concurrent writers commit `total` events in transactions of `per_txn` events.

    Each key belongs to one writer, as in an application where a key is an aggregate whose writes
    are serialised by its own row lock: id order is then the order the business meant."""
    written: list[Written] = []
    pool = await asyncpg.create_pool(database_url, min_size=writers, max_size=writers)
    remaining = [total]

    async def writer(n: int) -> None:
        rng = random.Random(n)
        while remaining[0] > 0:
            count = min(per_txn, remaining[0])
            remaining[0] -= count
            events = []
            for _ in range(count):
                topic = rng.choice(topics)
                key = f"k{rng.randrange(n, keys, writers)}"
                events.append(OutboxEvent(topic=topic, key=key, payload={"key": key, "w": n}))
            async with pool.acquire() as conn, conn.transaction():
                results = await aenqueue_many(conn, events, schema=schema)
            written.extend(
                Written(r.id or 0, str(r.message_id), e.topic, e.key or "")
                for r, e in zip(results, events, strict=True)
            )
            if pace:
                await asyncio.sleep(pace)

    try:
        await asyncio.gather(*(writer(n) for n in range(writers)))
    finally:
        await pool.close()
    return written


@dataclass(frozen=True)
class Received:
    message_id: str
    topic: str
    key: str


async def create_kafka_topic(bootstrap: str, topic: str, partitions: int = 8) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def read_kafka(bootstrap: str, topic: str) -> list[Received]:
    """Everything in the topic, partition by partition, in offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Received] = []
        idle_rounds = 0
        while idle_rounds < 5:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            if not any(batch.values()):
                idle_rounds += 1
                continue
            idle_rounds = 0
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers)
                    out.append(Received(headers["message-id"].decode(), topic, (record.key or b"").decode()))
        return out
    finally:
        await consumer.stop()


async def read_redis(redis_url: str, stream: str) -> list[Received]:
    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(stream)
        return [
            Received(fields[b"message-id"].decode(), stream, fields.get(b"key", b"").decode())
            for _, fields in entries
        ]
    finally:
        await client.aclose()


def check_delivery(written: Iterable[Written], received: Iterable[Received]) -> dict[str, int]:
    """Every written event arrived; per (topic, key), first arrivals follow id order.
    Returns counts, including duplicates (allowed only after crashes or lease loss)."""
    by_message = {w.message_id: w for w in written}
    seen: set[str] = set()
    duplicates = 0
    last_id: dict[tuple[str, str], int] = defaultdict(int)
    violations: list[str] = []
    for event in received:
        if event.message_id in seen:
            duplicates += 1
            continue
        seen.add(event.message_id)
        original = by_message.get(event.message_id)
        if original is None:
            continue
        group = (original.topic, original.key)
        if original.id < last_id[group]:
            violations.append(f"{group}: id {original.id} after {last_id[group]}")
        last_id[group] = max(last_id[group], original.id)
    missing = set(by_message) - seen
    assert not missing, f"{len(missing)} events never arrived, e.g. {sorted(missing)[:3]}"
    assert not violations, f"per-key order broken {len(violations)} times, e.g. {violations[:3]}"
    return {"delivered": len(seen), "duplicates": duplicates}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2, what: str = "condition"
) -> float:
    """Waits for `condition`; returns the seconds it took."""
    started = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def pending_count(database_url: str, schema: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".outbox'))
    finally:
        await conn.close()


async def leases_by_holder(database_url: str, schema: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f'SELECT name, holder FROM "{schema}".distributed_locks WHERE holder IS NOT NULL AND expires_at > now()'
        )
    finally:
        await conn.close()
    held: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        held[row["holder"]].append(row["name"])
    return dict(held)


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def relay_logs(fleet: Fleet) -> str:
    return "\n".join(f"--- {r.instance_id}\n{r.log()[-4000:]}" for r in fleet.relays)


@contextlib.contextmanager
def running(fleet: Fleet):  # type: ignore[no-untyped-def]
    try:
        yield fleet
    finally:
        fleet.stop_all()


def json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
