"""The relay-fleet harness shared by the acceptance tests, the benchmarks and the soak: real
`outbox-relay run` processes as children (killed, frozen, thawed, restarted at will), their
environment, waits on partition leases and on the outbox, writers committing real transactions,
and consumers reading back what reached Kafka and Redis Streams.

Statements the harness sends while relays are measured carry the `benchprobe` marker, which the
benchmarks use to leave their own statements out of pg_stat_statements."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clients.writer import OutboxEvent, aenqueue_many


def console_script(name: str) -> str:
    """The path of one of the project's console scripts: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"the {name} console script is not installed"
    return found


RELAY_BIN = console_script("outbox-relay")

# Short leases and polls so that failover and draining happen within a test's patience.
FAST_FAILOVER: Mapping[str, str] = {
    "OUTBOX_LEASE_TTL": "3",
    "OUTBOX_POLL_INTERVAL": "0.5",
    "OUTBOX_BATCH_SIZE": "200",
    "OUTBOX_SHUTDOWN_GRACE": "10",
    "OUTBOX_LOG_LEVEL": "INFO",
}


class FleetError(RuntimeError):
    """A relay of the fleet exited, or the fleet did not reach a state in time."""


# --- relay processes --------------------------------------------------------------------------------


def relay_env(
    database_url: str,
    schema: str,
    kafka: str = "",
    redis_url: str = "",
    *,
    tuning: Mapping[str, str] = FAST_FAILOVER,
    **extra: str,
) -> dict[str, str]:
    """The environment of an `outbox-relay run` process: the servers, `tuning` (FAST_FAILOVER unless
    told otherwise; {} for the relay's defaults), then `extra`."""
    env = {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_SCHEMA": schema}
    if kafka:
        env["OUTBOX_KAFKA_BOOTSTRAP"] = kafka
    if redis_url:
        env["OUTBOX_REDIS_URL"] = redis_url
    env.update(tuning)
    env.update(extra)
    return env


@dataclass
class RelayProcess:
    """One relay instance as a child process (so it can be killed, frozen, thawed and restarted).
    Its environment is this process's minus every OUTBOX_* variable, plus `env`."""

    instance_id: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        """Starts the process (again, after stop or a kill: the log is appended to)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env = {**base, "PYTHONUNBUFFERED": "1", **self.env, "OUTBOX_INSTANCE_ID": self.instance_id}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [RELAY_BIN, "run"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
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

    def terminate(self) -> None:
        """SIGTERM (after SIGCONT, in case it is frozen); does not wait."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)

    def reap(self, timeout: float = 30) -> None:
        """Waits up to `timeout` for the process to exit, then kills it."""
        if self.process is None:
            return
        try:
            self.process.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 30) -> None:
        self.terminate()
        self.reap(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Fleet:
    """Relay processes sharing one database schema and environment; logs go to `tmp`."""

    database_url: str
    schema: str
    tmp: Path
    base_env: dict[str, str]
    relays: list[RelayProcess] = field(default_factory=list)

    def spawn(self, instance_id: str, **env: str) -> RelayProcess:
        relay = RelayProcess(instance_id, {**self.base_env, **env}, self.tmp / f"{instance_id}.log").start()
        self.relays.append(relay)
        return relay

    def spawn_many(self, count: int, prefix: str = "relay", **env: str) -> list[RelayProcess]:
        """`count` relays named `<prefix>-<random>-<n>` (unique across runs sharing a log directory)."""
        run = uuid.uuid4().hex[:6]
        return [self.spawn(f"{prefix}-{run}-{n}", **env) for n in range(count)]

    @property
    def pids(self) -> list[int]:
        return [relay.pid for relay in self.relays]

    def live(self) -> list[RelayProcess]:
        return [relay for relay in self.relays if relay.alive()]

    def check_alive(self) -> None:
        """Raises FleetError, with the tail of its log, if a relay has exited."""
        for relay in self.relays:
            if relay.process is not None and not relay.alive():
                raise FleetError(
                    f"relay {relay.instance_id} (pid {relay.pid}) exited with {relay.process.returncode}:\n"
                    f"{relay.log()[-1500:]}"
                )

    def stop_all(self, timeout: float = 30) -> None:
        """SIGTERM to every relay at once, then waits for them all (up to `timeout`), killing stragglers."""
        for relay in self.relays:
            relay.terminate()
        deadline = time.monotonic() + timeout
        for relay in self.relays:
            relay.reap(deadline - time.monotonic())

    async def astop(self, timeout: float = 30) -> None:
        await asyncio.to_thread(self.stop_all, timeout)

    def logs(self) -> str:
        return relay_logs(self)

    async def partition_count(self) -> int:
        """The schema's partition count (relay_settings)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT value::int FROM \"{self.schema}\".relay_settings WHERE name = 'partitions'"
                )
            )
        finally:
            await conn.close()

    async def wait_partitions(
        self,
        timeout: float = 60,
        *,
        balanced: bool = False,
        require_alive: bool = False,
        interval: float = 0.1,
        conn: asyncpg.Connection | None = None,
    ) -> float:
        """Until every partition is leased (and, if `balanced`, every live relay holds its fair share);
        returns the seconds waited. `require_alive`: a relay that exits fails the wait at once.
        Raises FleetError (with the relays' logs) on timeout."""
        partitions = await self.partition_count()
        own = conn is None
        conn = conn or await asyncpg.connect(self.database_url)
        started = time.monotonic()
        try:
            while True:
                if require_alive:
                    self.check_alive()
                held = await partition_holders(conn, self.schema)
                live = len(self.live())
                done = sum(held.values()) == partitions
                if balanced:
                    done = done and len(held) == live and min(held.values(), default=0) >= partitions // live
                if done:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise FleetError(
                        f"partitions not {'balanced' if balanced else 'all leased'} within {timeout:.0f}s:"
                        f" {held}\n{relay_logs(self)}"
                    )
                await asyncio.sleep(interval)
        finally:
            if own:
                await conn.close()

    async def wait_drained(self, timeout: float = 60, interval: float = 0.2) -> float:
        """Until the outbox is empty; returns the seconds waited. AssertionError with the logs on timeout."""

        async def empty() -> bool:
            return await pending_count(self.database_url, self.schema) == 0

        try:
            return await wait_until(empty, timeout, interval, what="the outbox to drain")
        except AssertionError:
            raise AssertionError(relay_logs(self)) from None


def relay_logs(fleet: Fleet) -> str:
    return "\n".join(f"--- {r.instance_id}\n{r.log()[-4000:]}" for r in fleet.relays)


@contextlib.contextmanager
def running(fleet: Fleet) -> Iterator[Fleet]:
    try:
        yield fleet
    finally:
        fleet.stop_all()


# --- Postgres ---------------------------------------------------------------------------------------


async def partition_holders(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    """Partition leases currently held, by holder."""
    rows = await conn.fetch(
        f'/* fleet */ SELECT holder, count(*) AS benchprobe_held FROM "{schema}".distributed_locks'
        " WHERE name LIKE 'partition:%' AND holder IS NOT NULL AND expires_at > now()"
        " GROUP BY holder"
    )
    return {str(r["holder"]): int(r["benchprobe_held"]) for r in rows}


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


async def published_count(database_url: str, schema: str) -> int:
    """Events settled so far: the ids handed out (the outbox's identity sequence) minus those still
    in the outbox. A signal that traffic flows, e.g. before a fault is injected "mid-run"."""
    conn = await asyncpg.connect(database_url)
    try:
        value = await conn.fetchval(
            f"SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('\"{schema}\".outbox', 'id')), 0)"
            f' - (SELECT count(*) FROM "{schema}".outbox)'
        )
        return int(value)
    finally:
        await conn.close()


def pause_state(relay: RelayProcess) -> set[str]:
    """The pause patterns a relay obeys, replayed from its "pauses changed" log lines."""
    state: set[str] = set()
    for entry in json_lines(relay.log()):
        if entry.get("msg") == "pauses changed":
            paused, resumed = entry.get("paused") or [], entry.get("resumed") or []
            assert isinstance(paused, list) and isinstance(resumed, list), entry
            state = (state | set(paused)) - set(resumed)
    return state


async def all_obey(relays: Iterable[RelayProcess], patterns: set[str], timeout: float) -> float:
    """Waits until every relay obeys exactly `patterns`; returns how long that took."""
    relays = list(relays)

    async def obeyed() -> bool:
        return all(pause_state(r) == patterns for r in relays)

    return await wait_until(obeyed, timeout, interval=0.05, what=f"every relay to obey pauses {patterns}")


# --- writing events ---------------------------------------------------------------------------------


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


# --- Kafka and Redis --------------------------------------------------------------------------------


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


async def delete_kafka_topic(bootstrap: str, topic: str) -> bool:
    """Best effort (frees the embedded broker's memory); False if it failed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics([topic])
        return True
    except Exception:
        return False
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def topic_from_start(bootstrap: str, topic: str, **options: Any) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer assigned every partition of `topic`, at the beginning (no group, no commits)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", **options
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
        yield consumer
    finally:
        await consumer.stop()


async def read_kafka(
    bootstrap: str, topic: str, expect: Collection[str] = (), patience: float = 20.0
) -> list[Received]:
    """Everything in the topic, partition by partition, in offset order. Stops after 1 s without a
    new record, or, when `expect` names message ids, once all of them were read or after `patience`
    seconds without a new record (a broker just thawed can be slow to serve its first fetches)."""
    wanted = set(expect)
    async with topic_from_start(bootstrap, topic, fetch_max_wait_ms=20) as consumer:
        out: list[Received] = []
        last_progress = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            if any(batch.values()):
                last_progress = time.monotonic()
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers)
                    message_id = headers["message-id"].decode()
                    wanted.discard(message_id)
                    out.append(Received(message_id, topic, (record.key or b"").decode()))
            idle = time.monotonic() - last_progress
            if (expect and not wanted) or idle >= (patience if wanted else 1.0):
                return out


async def count_kafka_records(bootstrap: str, topic: str, expected: int, idle: float = 3.0) -> int:
    """Reads the topic from the start and counts records (Tansu's end offsets cannot be trusted).
    Stops at `expected` or after `idle` seconds without a new record."""
    async with topic_from_start(
        bootstrap, topic, fetch_max_wait_ms=5, max_partition_fetch_bytes=8 * 2**20, fetch_max_bytes=64 * 2**20
    ) as consumer:
        count, last_progress = 0, time.monotonic()
        while count < expected and time.monotonic() - last_progress < idle:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            got = sum(len(records) for records in batch.values())
            if got:
                count += got
                last_progress = time.monotonic()
        return count


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


# --- checking delivery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryTally:
    """What consumers received, against what was written."""

    seen: set[str]  # distinct message ids received
    duplicates: int  # copies after the first
    violations: list[str]  # first arrivals out of id order within a (topic, key)


def tally_delivery(written: Iterable[Written], received: Iterable[Received]) -> DeliveryTally:
    """Per (topic, key) of the written events, first arrivals must follow id order."""
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
    return DeliveryTally(seen, duplicates, violations)


def check_delivery(written: Iterable[Written], received: Iterable[Received]) -> dict[str, int]:
    """Every written event arrived; per (topic, key), first arrivals follow id order.
    Returns counts, including duplicates (allowed only after crashes or lease loss)."""
    written = list(written)
    tally = tally_delivery(written, received)
    missing = {w.message_id for w in written} - tally.seen
    assert not missing, f"{len(missing)} events never arrived, e.g. {sorted(missing)[:3]}"
    assert not tally.violations, (
        f"per-key order broken {len(tally.violations)} times, e.g. {tally.violations[:3]}"
    )
    return {"delivered": len(tally.seen), "duplicates": tally.duplicates}


# --- small helpers ----------------------------------------------------------------------------------


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


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
