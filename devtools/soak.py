"""Soak: a relay fleet runs for N minutes on real servers while faults are injected one at a time;
then nothing may be lost, reordered or dead-lettered, and no relay may grow or die on its own.

    .venv/bin/python -m devtools.soak --minutes 5 [--relays 3] [--rate 200] [--report PATH]
    ./dev soak --minutes 5

Servers: the embedded stack (devtools/embedded.py), or external ones named by the variables the tests
use (OUTBOX_TEST_DATABASE_URL, OUTBOX_TEST_KAFKA_BOOTSTRAP, OUTBOX_TEST_REDIS_URL). Against external
servers the faults that need a server's process (Postgres restart, broker freeze, Redis maxmemory)
are skipped; cancel storms and table locks act server-wide, so use servers nobody else relies on.

Workload: `--writers` writers commit `--rate` events/s in transactions of `--per-txn`, over `--keys`
keys, each key owned by one writer (as devtools.fleet.write_events does), so id order per
key is the order meant. About `--kafka-share` of the events go to a Kafka topic with 8 partitions,
the rest to a Redis stream (routed by OUTBOX_ROUTES). `--relays` real `outbox-relay run` processes
(devtools.fleet.Fleet) relay them; each serves /metrics and /readyz, and its database URL
carries `lock_timeout` (asyncpg sends unknown URL parameters as server settings). A checking
consumer reads Kafka and the stream all along.

Faults, in a random order that repeats every kind before any kind twice, each for a random time,
with a random recovery gap between: kill -9 of a relay (respawned later under a new instance id);
SIGSTOP of a relay past its lease TTL, then SIGCONT; broker freeze (SIGSTOP of Tansu); Redis at
maxmemory with noeviction; a Postgres restart; a cancel storm (pg_cancel_backend on every
`outbox-relay%` backend, repeatedly); ACCESS EXCLUSIVE locks on the outbox and distributed_locks.

At the end writers stop, relays drain (bounded), everything is read back and the run FAILS (exit 1)
on: events left in the outbox; lost events; first deliveries out of per-key order; duplicates above
the bound; delivered events nobody wrote; dead letters; a relay that exited without being killed;
RSS growth above 50 % (median of the last quarter of a relay's samples over the first quarter's,
relays that lived at least 60 s).

Duplicate bound: a copy is sent only for a batch in flight when a relay crashed, lost its lease or
could not settle, at most one batch per partition per fault. So the bound is batch size x the
partitions each fault put at risk, summed over the faults: a relay kill or stop risks the
partitions it held at that moment, every other fault (broker, Redis, database, cancel storm,
locks) risks them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from clients.writer import OutboxEvent, aenqueue_many
from devtools.embedded import EmbeddedStack, StackEndpoints, external_or_embedded, free_port
from devtools.fleet import (
    Fleet,
    FleetError,
    Received,
    RelayProcess,
    Written,
    create_kafka_topic,
    leases_by_holder,
    pending_count,
    read_kafka,
    read_redis,
    relay_env,
    unique_name,
    wait_until,
)
from devtools.soak_report import (
    FaultRecord,
    RelayInfo,
    Seen,
    SoakResult,
    WriterStats,
    analyse_delivery,
    attribute_duplicates,
    build_checks,
    log_findings,
    render,
    summary,
    warnings_by_fault,
)
from relay import migrate
from relay.config import DatabaseSettings

KAFKA_PARTITIONS = 8
RECOVERY_GAP = (4.0, 10.0)  # seconds between the end of one fault and the start of the next


@dataclass(frozen=True)
class FaultKind:
    name: str
    low: float  # seconds, drawn uniformly
    high: float
    needs: str = ""  # the embedded server whose process it touches
    past_lease: bool = False  # the lease TTL is added to the drawn duration


FAULT_KINDS = (
    FaultKind("kill_relay", 1, 5),  # duration: until the replacement starts
    FaultKind("stop_relay", 1, 6, past_lease=True),
    FaultKind("broker_freeze", 3, 12, needs="kafka"),
    FaultKind("redis_maxmemory", 3, 10, needs="redis"),
    FaultKind("postgres_restart", 1, 5, needs="postgres"),  # duration: time down
    FaultKind("cancel_storm", 3, 8),
    FaultKind("lock_hold", 2, 6),
)


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    relays: int
    rate: float
    keys: int
    writers: int
    per_txn: int
    kafka_share: float
    batch_size: int
    lease_ttl: float
    lock_timeout: str
    drain_timeout: float
    seed: int
    report: Path
    log_dir: Path
    relay_env: dict[str, str]
    warmup: float = 10.0
    tail: float = 10.0


# -- small helpers ---------------------------------------------------------------------------------


def with_query(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), (name, value)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


async def http_get(addr: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body); (0, "") when the server does not answer in time."""
    host, _, port = addr.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, TimeoutError):
        return 0, ""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        return 0, ""
    finally:
        writer.close()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    fields = head.split(" ", 2)
    return (int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0), body


def counters(metrics_text: str) -> dict[str, float]:
    """Counter totals by family name, summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.type == "counter":
            totals[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


COUNTED = {
    "outbox_publish_failures": "publish failures",
    "outbox_retries": "retries",
    "outbox_events_dead_lettered": "dead-lettered",
    "outbox_lease_changes": "lease changes",
}


def counter_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """What relays alive at both ends (or started since) counted in between."""
    totals: Counter[str] = Counter()
    for instance, metrics in after.items():
        for name, label in COUNTED.items():
            totals[label] += int(metrics.get(name, 0) - before.get(instance, {}).get(name, 0))
    return ", ".join(f"{label} +{totals[label]}" for label in COUNTED.values() if totals[label] > 0) or "-"


async def close_quietly(conn: asyncpg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)


def log(began: float, message: str) -> None:
    print(f"[{time.monotonic() - began:7.1f}s] {message}", flush=True)


# -- the run ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, cfg: SoakConfig, endpoints: StackEndpoints, stack: EmbeddedStack | None) -> None:
        self.cfg = cfg
        self.endpoints = endpoints
        self.stack = stack
        self.rng = random.Random(cfg.seed)
        self.began = time.monotonic()
        self.began_wall = time.time()
        self.schema = unique_name("soak_")
        self.topics = {"kafka": unique_name("soak.kafka."), "redis": unique_name("soak.redis.")}
        self.env = self._relay_env()
        self.fleet = Fleet(endpoints.database_url, self.schema, cfg.log_dir, self.env)
        self.partitions = 16
        self.relays: dict[str, RelayInfo] = {}
        self.killed: set[str] = set()
        self.frozen: set[str] = set()
        self.faults: list[FaultRecord] = []
        self.writer_stats = WriterStats()
        self.seen: list[Seen] = []
        self.first_seen: set[str] = set()
        self.latencies: list[float] = []
        self.consumer_errors: Counter[str] = Counter()
        self.writing = True
        self.done = False
        self.next_relay = 0

    def now(self) -> float:
        return time.monotonic() - self.began

    def say(self, message: str) -> None:
        log(self.began, message)

    def _relay_env(self) -> dict[str, str]:
        url = with_query(self.endpoints.database_url, "lock_timeout", self.cfg.lock_timeout)
        extra = {
            "OUTBOX_ROUTES": "soak.redis.*=redis",
            "OUTBOX_LEASE_TTL": str(self.cfg.lease_ttl),
            "OUTBOX_BATCH_SIZE": str(self.cfg.batch_size),
            "OUTBOX_BACKOFF_MAX": "10",
            "OUTBOX_SINK_BACKOFF_MAX": "5",
            **self.cfg.relay_env,
        }
        return relay_env(url, self.schema, self.endpoints.kafka_bootstrap, self.endpoints.redis_url, **extra)

    # -- setup ------------------------------------------------------------------------------------

    async def setup(self) -> None:
        settings = DatabaseSettings(
            database_url=SecretStr(self.endpoints.database_url), schema_name=self.schema
        )
        await asyncio.to_thread(migrate.upgrade, settings)
        self.partitions = await self.fleet.partition_count()
        await create_kafka_topic(self.endpoints.kafka_bootstrap, self.topics["kafka"], KAFKA_PARTITIONS)
        for _ in range(self.cfg.relays):
            self.spawn_relay()
        try:
            await self.fleet.wait_partitions(60, interval=0.5)
        except FleetError as exc:  # the relays' logs are summarised by soak(), not dumped here
            raise AssertionError(str(exc).split("\n", 1)[0]) from None
        self.say(
            f"{self.cfg.relays} relays hold all {self.partitions} partitions; logs in {self.cfg.log_dir}"
        )

    def spawn_relay(self) -> RelayProcess:
        instance = f"soak-r{self.next_relay}"
        self.next_relay += 1
        addr = f"127.0.0.1:{free_port()}"
        relay = self.fleet.spawn(instance, OUTBOX_METRICS_ADDR=addr)
        self.relays[instance] = RelayInfo(instance, relay.pid, addr, relay.log_path, self.now())
        return relay

    def mark_ended(self, relay: RelayProcess, end: str, *, unexpected: bool = False) -> None:
        info = self.relays[relay.instance_id]
        info.ended = self.now()
        info.exit_code = relay.process.returncode if relay.process else None
        info.end = f"{end} (exit code {info.exit_code})"
        info.unexpected_exit = unexpected

    def live_relays(self) -> list[RelayProcess]:
        return [r for r in self.fleet.relays if r.alive() and self.relays[r.instance_id].ended is None]

    # -- writers ----------------------------------------------------------------------------------

    async def writer(self, n: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + n)
        owned = [f"k{k}" for k in range(n, self.cfg.keys, self.cfg.writers)]
        interval = self.cfg.per_txn * self.cfg.writers / self.cfg.rate
        conn: asyncpg.Connection | None = None
        next_at = time.monotonic()
        while self.writing:
            next_at = max(next_at + interval, time.monotonic() - 1.0)  # no bursts after a stall
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(
                        self.endpoints.database_url,
                        timeout=5,
                        server_settings={"application_name": f"soak-writer-{n}"},
                    )
                await self.write_txn(conn, n, rng, owned)
            except Exception as exc:
                self.writer_stats.errors[type(exc).__name__] += 1
                await close_quietly(conn)
                conn = None
                await asyncio.sleep(0.5)
        await close_quietly(conn)

    def make_events(self, n: int, rng: random.Random, owned: list[str]) -> list[OutboxEvent]:
        events = []
        for _ in range(self.cfg.per_txn):
            key = rng.choice(owned)
            topic = self.topics["kafka"] if rng.random() < self.cfg.kafka_share else self.topics["redis"]
            payload = {"key": key, "w": n, "t": time.time()}
            events.append(OutboxEvent(topic=topic, payload=payload, key=key, message_id=uuid.uuid4()))
        return events

    async def write_txn(self, conn: asyncpg.Connection, n: int, rng: random.Random, owned: list[str]) -> None:
        events = self.make_events(n, rng, owned)
        txn = conn.transaction()
        await txn.start()
        try:
            results = await aenqueue_many(conn, events, schema=self.schema)
        except BaseException:
            self.writer_stats.failed_txns += 1
            with contextlib.suppress(Exception):
                await txn.rollback()
            raise
        try:
            await txn.commit()
        except BaseException:
            self.writer_stats.uncertain.update(str(e.message_id) for e in events)
            raise
        self.writer_stats.txns += 1
        self.writer_stats.written.extend(
            Written(r.id or 0, str(r.message_id), e.topic, e.key or "")
            for r, e in zip(results, events, strict=True)
        )

    # -- the checking consumer --------------------------------------------------------------------

    def record(self, message_id: str, published: float, payload: bytes) -> None:
        self.seen.append(Seen(message_id, published, None))
        if message_id in self.first_seen:
            return
        self.first_seen.add(message_id)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.latencies.append(time.time() - float(json.loads(payload)["t"]))

    async def consume_kafka(self) -> None:
        offsets: dict[int, int] = {}
        while not self.done:
            try:
                await self._consume_kafka(offsets)
            except Exception as exc:
                self.consumer_errors[f"kafka {type(exc).__name__}"] += 1
                await asyncio.sleep(1)

    async def _consume_kafka(self, offsets: dict[int, int]) -> None:
        topic = self.topics["kafka"]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.endpoints.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(KAFKA_PARTITIONS)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, offsets.get(tp.partition, 0))
            while not self.done:
                batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                for tp, records in batch.items():
                    for r in records:
                        message_id = dict(r.headers).get("message-id", b"").decode()
                        self.record(message_id, r.timestamp / 1000, r.value or b"")
                        offsets[tp.partition] = r.offset + 1
        finally:
            await consumer.stop()

    async def consume_redis(self) -> None:
        stream, last = self.topics["redis"], "0-0"
        client = aioredis.from_url(self.endpoints.redis_url)
        try:
            while not self.done:
                try:
                    reply = await client.xread({stream: last}, count=2000, block=500)
                except Exception as exc:
                    self.consumer_errors[f"redis {type(exc).__name__}"] += 1
                    await asyncio.sleep(1)
                    continue
                for _, entries in reply:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        published = int(last.split("-")[0]) / 1000
                        self.record(
                            fields.get(b"message-id", b"").decode(), published, fields.get(b"payload", b"")
                        )
        finally:
            await client.aclose()

    # -- samplers ---------------------------------------------------------------------------------

    async def sample_rss(self) -> None:
        while not self.done:
            for relay in self.live_relays():
                kib = rss_kib(relay.pid)
                if kib:
                    self.relays[relay.instance_id].rss.append((self.now(), kib))
            await asyncio.sleep(2)

    async def sample_http(self) -> None:
        while not self.done:
            await self.probe_all()
            await asyncio.sleep(5)

    async def probe_all(self) -> None:
        relays = [r for r in self.live_relays() if r.instance_id not in self.frozen]
        await asyncio.gather(*(self.probe(self.relays[r.instance_id]) for r in relays))

    async def probe(self, info: RelayInfo) -> None:
        status, _ = await http_get(info.metrics_addr, "/readyz")
        info.ready["ready" if status == 200 else "not-ready" if status else "unreachable"] += 1
        status, body = await http_get(info.metrics_addr, "/metrics")
        if status == 200:
            with contextlib.suppress(ValueError):
                info.metrics = counters(body)

    async def watch_exits(self) -> None:
        while not self.done:
            for relay in list(self.fleet.relays):
                info = self.relays[relay.instance_id]
                if info.ended is None and not relay.alive() and relay.instance_id not in self.killed:
                    self.mark_ended(relay, "exited on its own", unexpected=True)
                    self.say(f"!! {relay.instance_id} exited on its own (code {info.exit_code}); respawning")
                    self.spawn_relay()
            await asyncio.sleep(0.5)

    async def progress(self) -> None:
        while not self.done:
            await asyncio.sleep(10)
            try:
                pending: object = await asyncio.wait_for(
                    pending_count(self.endpoints.database_url, self.schema), 3
                )
            except Exception as exc:
                pending = type(exc).__name__
            self.say(
                f"written {len(self.writer_stats.written)}, consumed {len(self.seen)}, pending {pending}, "
                f"relays {len(self.live_relays())}, faults {len(self.faults)}"
            )

    # -- faults -----------------------------------------------------------------------------------

    def available_kinds(self) -> list[FaultKind]:
        embedded = set(self.stack.pids()) if self.stack else set()
        return [k for k in FAULT_KINDS if not k.needs or k.needs in embedded]

    async def inject_faults(self) -> None:
        await asyncio.sleep(self.cfg.warmup)
        kinds, order = self.available_kinds(), list[FaultKind]()
        last_end = self.cfg.minutes * 60 - self.cfg.tail
        while True:
            if not order:
                order = self.rng.sample(kinds, len(kinds))
                if len(order) > 1 and self.faults and order[0].name == self.faults[-1].kind:
                    order.append(order.pop(0))  # never the same kind twice in a row
            planned = self.next_fault(order, last_end - self.now() - 1)
            if planned is None:
                return
            kind, duration = planned
            gap = self.rng.uniform(*RECOVERY_GAP)
            await self.run_fault(kind, duration, gap)

    def next_fault(self, order: list[FaultKind], room: float) -> tuple[FaultKind, float] | None:
        """The first kind in `order` that fits in `room` seconds (removed from it), with a duration."""
        for kind in order:
            extra = self.cfg.lease_ttl if kind.past_lease else 0.0
            if kind.low + extra <= room:
                order.remove(kind)
                return kind, min(room, self.rng.uniform(kind.low, kind.high) + extra)
        return None

    async def run_fault(self, kind: FaultKind, duration: float, gap: float) -> None:
        """Injects one fault, then waits `gap` seconds of recovery; records what relays counted."""
        record = FaultRecord(kind.name, self.now(), duration)
        self.faults.append(record)
        self.say(f"fault {kind.name} for {duration:.1f}s")
        before = await self.counter_snapshot()
        started = time.monotonic()
        try:
            await getattr(self, f"fault_{kind.name}")(record)
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:200]
            self.say(f"fault {kind.name} failed: {record.error}")
        record.took = time.monotonic() - started
        await asyncio.sleep(gap)
        record.counted = counter_delta(before, await self.counter_snapshot())

    async def counter_snapshot(self) -> dict[str, dict[str, float]]:
        await self.probe_all()
        return {r.instance_id: dict(self.relays[r.instance_id].metrics) for r in self.live_relays()}

    def pick_relay(self) -> RelayProcess:
        candidates = [r for r in self.live_relays() if r.instance_id not in self.frozen]
        if not candidates:
            raise RuntimeError("no live relay to pick")
        return self.rng.choice(candidates)

    async def partitions_held(self, instance: str) -> int:
        try:
            held = await asyncio.wait_for(leases_by_holder(self.endpoints.database_url, self.schema), 3)
        except Exception:
            return self.partitions  # unknown: assume the worst
        return sum(1 for n in held.get(instance, []) if n.startswith("partition:"))

    async def fault_kill_relay(self, record: FaultRecord) -> None:
        victim = self.pick_relay()
        record.target = victim.instance_id
        record.at_risk = await self.partitions_held(victim.instance_id)
        self.killed.add(victim.instance_id)
        victim.signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)
        self.mark_ended(victim, "killed -9 by the soak")
        await asyncio.sleep(record.duration)
        replacement = self.spawn_relay()
        record.detail = (
            f"pid {victim.pid} held {record.at_risk} partitions; respawned as {replacement.instance_id}"
        )

    async def fault_stop_relay(self, record: FaultRecord) -> None:
        victim = self.pick_relay()
        record.target = victim.instance_id
        record.at_risk = await self.partitions_held(victim.instance_id)
        self.frozen.add(victim.instance_id)
        victim.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(record.duration)
        finally:
            victim.signal(signal.SIGCONT)
            self.frozen.discard(victim.instance_id)
        record.detail = (
            f"SIGSTOP then SIGCONT; lease TTL {self.cfg.lease_ttl:g}s; held {record.at_risk} partitions"
        )

    async def fault_broker_freeze(self, record: FaultRecord) -> None:
        assert self.stack is not None
        pid = self.stack.pids()["kafka"]
        record.target, record.at_risk = f"tansu pid {pid}", self.partitions
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(record.duration)
        finally:
            os.kill(pid, signal.SIGCONT)
        record.detail = "SIGSTOP then SIGCONT of the Kafka broker"

    async def fault_redis_maxmemory(self, record: FaultRecord) -> None:
        client = aioredis.from_url(self.endpoints.redis_url)
        record.target, record.at_risk = "redis", self.partitions
        try:
            before = await client.config_get("maxmemory*")
            used = await self.redis_used_memory(client)
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", used + 16 * 1024)
            try:
                await asyncio.sleep(record.duration)
                reached = await self.redis_used_memory(client)
            finally:
                await client.config_set("maxmemory", before.get("maxmemory", "0"))
                await client.config_set("maxmemory-policy", before.get("maxmemory-policy", "noeviction"))
            record.detail = (
                f"maxmemory = used_memory {used} + 16 KiB with noeviction, then restored; "
                f"used_memory {reached} at the end"
            )
        finally:
            await client.aclose()

    @staticmethod
    async def redis_used_memory(client: aioredis.Redis) -> int:
        info: dict[str, Any] = await client.info("memory")
        return int(info["used_memory"])

    async def fault_postgres_restart(self, record: FaultRecord) -> None:
        assert self.stack is not None
        record.target, record.at_risk = "postgres", self.partitions
        await asyncio.to_thread(self.stack.stop_postgres)
        try:
            await asyncio.sleep(record.duration)
        finally:
            began = time.monotonic()
            await asyncio.to_thread(self.stack.start_postgres)
        record.detail = (
            f"fast shutdown, down {record.duration:.1f}s, restart took {time.monotonic() - began:.1f}s"
        )

    async def fault_cancel_storm(self, record: FaultRecord) -> None:
        record.target, record.at_risk = "outbox-relay% backends", self.partitions
        conn = await asyncpg.connect(
            self.endpoints.database_url, server_settings={"application_name": "soak-faults"}
        )
        rounds = active = 0
        try:
            deadline = time.monotonic() + record.duration
            while time.monotonic() < deadline:
                row = await conn.fetchrow(
                    """SELECT count(*) FILTER (WHERE state = 'active') AS active,
                              count(*) FILTER (WHERE pg_cancel_backend(pid)) AS signalled
                       FROM pg_stat_activity
                       WHERE application_name LIKE 'outbox-relay%' AND pid <> pg_backend_pid()"""
                )
                rounds, active = rounds + 1, active + int(row["active"] if row else 0)
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        finally:
            await close_quietly(conn)
        record.detail = f"{rounds} rounds of pg_cancel_backend; {active} backends were active when signalled"

    async def fault_lock_hold(self, record: FaultRecord) -> None:
        record.target, record.at_risk = "outbox, distributed_locks", self.partitions
        conn = await asyncpg.connect(
            self.endpoints.database_url, server_settings={"application_name": "soak-faults"}
        )
        try:
            async with conn.transaction():
                began = time.monotonic()
                await conn.execute(
                    f'LOCK TABLE "{self.schema}".outbox, "{self.schema}".distributed_locks IN ACCESS EXCLUSIVE MODE',
                    timeout=10,
                )
                waited = time.monotonic() - began
                await asyncio.sleep(record.duration)
        finally:
            await close_quietly(conn)
        record.detail = (
            f"ACCESS EXCLUSIVE held {record.duration:.1f}s (acquired in {waited:.2f}s); "
            f"relays run with lock_timeout={self.cfg.lock_timeout}"
        )

    # -- the end ----------------------------------------------------------------------------------

    async def drain(self) -> str:
        async def empty() -> bool:
            with contextlib.suppress(Exception):
                return await pending_count(self.endpoints.database_url, self.schema) == 0
            return False

        try:
            took = await wait_until(empty, self.cfg.drain_timeout, interval=0.5, what="the outbox to drain")
        except AssertionError:
            left = await pending_count(self.endpoints.database_url, self.schema)
            return f"{left} events still pending after {self.cfg.drain_timeout:.0f}s"
        return f"empty {took:.1f}s after writers stopped"

    async def consumer_caught_up(self, timeout: float = 60) -> None:
        """Until the checking consumer has read nothing new for 3 s."""
        deadline, count, quiet_since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.seen) != count:
                count, quiet_since = len(self.seen), time.monotonic()
            elif time.monotonic() - quiet_since > 3:
                return
            await asyncio.sleep(0.25)

    async def read_back(self) -> list[Received]:
        kafka = await read_kafka(self.endpoints.kafka_bootstrap, self.topics["kafka"])
        return kafka + await read_redis(self.endpoints.redis_url, self.topics["redis"])

    def consumer_note(self, received: list[Received]) -> str:
        live, final = Counter(s.message_id for s in self.seen), Counter(r.message_id for r in received)
        only_live = set(live) - set(final)
        note = f"live {sum(live.values())} copies, read-back {sum(final.values())} copies"
        note += (
            f"; {len(only_live)} ids seen live but missing from the read-back" if only_live else "; same ids"
        )
        errors = ", ".join(f"{k}: {n}" for k, n in self.consumer_errors.most_common())
        return note + (f"; consumer errors {errors}" if errors else "")

    async def dead_letters(self) -> list[dict[str, object]]:
        conn = await asyncpg.connect(self.endpoints.database_url)
        try:
            rows = await conn.fetch(
                f"""SELECT reason, topic, count(*) AS count, string_agg(DISTINCT archived_by, ', ') AS archived_by,
                           left(max(last_error), 300) AS last_error
                    FROM "{self.schema}".dead_letter_archive GROUP BY reason, topic ORDER BY count DESC"""
            )
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    async def stop_fleet(self) -> None:
        await self.probe_all()
        running = self.live_relays()
        await asyncio.to_thread(self.fleet.stop_all)
        for relay in running:
            self.mark_ended(relay, "stopped by the soak (SIGTERM)")

    def settings(self) -> dict[str, str]:
        cfg = self.cfg
        servers = "embedded: " + ", ".join(sorted(self.stack.pids())) if self.stack else "external"
        return {
            "started": datetime.fromtimestamp(self.began_wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "minutes": f"{cfg.minutes:g}",
            "relays": str(cfg.relays),
            "write rate (events/s)": f"{cfg.rate:g} by {cfg.writers} writers, {cfg.per_txn} per transaction",
            "keys": str(cfg.keys),
            "topics": f"{self.topics['kafka']} (Kafka, {KAFKA_PARTITIONS} partitions, {cfg.kafka_share:.0%}), "
            f"{self.topics['redis']} (Redis stream)",
            "schema / partitions": f"{self.schema} / {self.partitions}",
            "relay settings": ", ".join(
                f"{k}={self.env[k]}"
                for k in sorted(self.env)
                if k not in ("OUTBOX_DATABASE_URL", "OUTBOX_REDIS_URL")
            ),
            "relay lock_timeout (URL parameter)": cfg.lock_timeout,
            "servers": servers,
            "fault kinds": ", ".join(k.name for k in self.available_kinds()),
            "recovery gap (s)": f"{RECOVERY_GAP[0]:g}-{RECOVERY_GAP[1]:g}; warm-up {cfg.warmup:g}, quiet tail {cfg.tail:g}",
            "seed": str(cfg.seed),
            "machine": f"{os.cpu_count()} CPUs",
        }

    async def finish(self, tasks: dict[str, asyncio.Task[None]]) -> SoakResult:
        self.writing = False
        await asyncio.gather(*(t for name, t in tasks.items() if name.startswith("writer")))
        self.say(f"writers stopped after {len(self.writer_stats.written)} events; draining")
        drain = await self.drain()
        self.say(f"drain: {drain}")
        await self.consumer_caught_up()
        received = await self.read_back()
        self.done = True
        await self.stop_fleet()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return await self.result(drain, received)

    async def result(self, drain: str, received: list[Received]) -> SoakResult:
        stats = self.writer_stats
        delivery = analyse_delivery(stats.written, received, stats.uncertain)
        before = attribute_duplicates(self.seen, self.faults, self.began_wall)
        warnings_by_fault(self.faults, (r.log_path for r in self.relays.values()), self.began_wall)
        batch = int(self.env["OUTBOX_BATCH_SIZE"])
        result = SoakResult(
            settings=self.settings(),
            faults=self.faults,
            relays=list(self.relays.values()),
            writers=stats,
            delivery=delivery,
            duplicate_bound=batch * sum(f.at_risk for f in self.faults if not f.error),
            duplicates_before_faults=before,
            latencies=self.latencies,
            drain=drain,
            dead_letters=await self.dead_letters(),
            consumer_note=self.consumer_note(received),
            log_dir=self.cfg.log_dir,
        )
        result.checks = build_checks(result, [k.name for k in self.available_kinds()])
        return result


class SetupFailedError(Exception):
    """The fleet never got going: nothing to soak."""


async def soak(cfg: SoakConfig, endpoints: StackEndpoints, stack: EmbeddedStack | None) -> SoakResult:
    run = Soak(cfg, endpoints, stack)
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        try:
            await run.setup()
        except AssertionError as exc:
            found = log_findings(r.log_path for r in run.relays.values())
            raise SetupFailedError(
                f"{exc}; relay logs in {cfg.log_dir}, most frequent problems:", found
            ) from None
        background = {
            "kafka": run.consume_kafka(),
            "redis": run.consume_redis(),
            "rss": run.sample_rss(),
            "http": run.sample_http(),
            "exits": run.watch_exits(),
            "progress": run.progress(),
            **{f"writer{n}": run.writer(n) for n in range(cfg.writers)},
        }
        tasks = {name: asyncio.create_task(c, name=f"soak-{name}") for name, c in background.items()}
        await run.inject_faults()
        await asyncio.sleep(max(0.0, cfg.minutes * 60 - run.now()))
        return await run.finish(tasks)
    finally:
        run.done, run.writing = True, False
        for task in tasks.values():
            task.cancel()
        await asyncio.to_thread(run.fleet.stop_all)


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> SoakConfig:
    p = argparse.ArgumentParser(prog="devtools.soak", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--minutes", type=float, required=True, help="how long writers write and faults happen")
    p.add_argument("--relays", type=int, default=3)
    p.add_argument("--rate", type=float, default=200.0, help="events per second, all writers together")
    p.add_argument("--keys", type=int, default=300)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--per-txn", type=int, default=5, help="events per writer transaction")
    p.add_argument(
        "--kafka-share", type=float, default=0.7, help="fraction of events for Kafka (rest: Redis)"
    )
    p.add_argument("--batch-size", type=int, default=200, help="OUTBOX_BATCH_SIZE")
    p.add_argument("--lease-ttl", type=float, default=3.0, help="OUTBOX_LEASE_TTL")
    p.add_argument("--lock-timeout", default="200ms", help="lock_timeout of the relays' sessions")
    p.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to wait for an empty outbox")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--report", type=Path, default=None, help="default bench/results/soak-<date>.md")
    p.add_argument("--log-dir", type=Path, default=None, help="relay logs; default /tmp/outbox-soak-<time>")
    p.add_argument(
        "--relay-env", action="append", default=[], metavar="OUTBOX_X=V", help="extra relay setting"
    )
    a = p.parse_args(argv)
    stamp = datetime.now(UTC)
    return SoakConfig(
        minutes=a.minutes,
        relays=a.relays,
        rate=a.rate,
        keys=a.keys,
        writers=a.writers,
        per_txn=a.per_txn,
        kafka_share=a.kafka_share,
        batch_size=a.batch_size,
        lease_ttl=a.lease_ttl,
        lock_timeout=a.lock_timeout,
        drain_timeout=a.drain_timeout,
        seed=a.seed if a.seed is not None else random.randrange(1_000_000),
        report=a.report or default_report_path(stamp),
        log_dir=a.log_dir or Path(f"/tmp/outbox-soak-{stamp:%Y%m%d-%H%M%S}"),
        relay_env=dict(item.split("=", 1) for item in a.relay_env),
    )


def default_report_path(stamp: datetime) -> Path:
    path = Path("bench/results") / f"soak-{stamp:%Y-%m-%d}.md"
    return path.with_name(f"soak-{stamp:%Y-%m-%d-%H%M%S}.md") if path.exists() else path


async def main_async(cfg: SoakConfig) -> int:
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    this = asyncio.current_task()
    if this is not None:  # SIGTERM unwinds like Ctrl-C: faults undone, relays and servers stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    endpoints, stack = await asyncio.to_thread(external_or_embedded, "OUTBOX_TEST_")
    try:
        result = await soak(cfg, endpoints, stack)
    except SetupFailedError as exc:
        message, found = exc.args
        print(f"soak could not start: {message}", file=sys.stderr)
        print("\n".join(f"  {n:5d}  {line}" for n, line in found), file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    cfg.report.write_text(render(result))
    print(summary(result))
    print(f"report: {cfg.report}\nrelay logs: {cfg.log_dir}")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(main_async(parse_args(argv)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak interrupted: nothing reported", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
