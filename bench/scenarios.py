"""The scenarios. Each adds figures to `Results`; ratios use the raw ceilings measured in this run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psutil
from aiokafka import AIOKafkaProducer

from bench import ceilings, consumer, workload
from bench.pacing import paced
from bench.plan import Plan
from bench.report import Bar, Figure, Results
from bench.stack import (
    BenchError,
    CpuTrace,
    Servers,
    broker_process,
    cpu_by_pid,
    create_topic,
    dead_letters,
    delete_topic,
    fresh_schema,
    machine_busy_since,
    machine_cpu,
    oldest_pending_age,
    pending,
    postgres_cpu_since,
    postgres_processes,
    relay_cpu_seconds,
    relays,
    wait_drained,
)
from bench.stats import latency_summary, median, ratio, time_bins, value_at_fraction
from clients.writer import aenqueue
from devtools.fleet import Fleet, count_kafka_records, redis_delete, redis_stream_length
from relay.config import RelaySettings

log = logging.getLogger("bench")

Ceilings = dict[str, float]  # "kafka.200B" -> median messages/s, "writer" -> commits/s, ...


async def repeat(plan: Plan, label: str, once: Callable[[int], Awaitable[float]]) -> list[float]:
    values = []
    for rep in range(plan.reps):
        value = await once(rep)
        log.info("%s rep %d/%d: %.4g", label, rep + 1, plan.reps, value)
        values.append(value)
    return values


# --- raw ceilings -----------------------------------------------------------------------------------


async def run_ceilings(servers: Servers, plan: Plan, results: Results, which: set[str]) -> Ceilings:
    out: Ceilings = {}

    def add(name: str, key: str, values: list[float], unit: str, note: str = "") -> None:
        out[key] = median(values)
        results.add(Figure(f"ceiling.{name}", out[key], unit, "ceiling", reps=values, note=note))

    for label, size in workload.SIZES.items():
        if "pg" in which:
            values = await repeat(
                plan,
                f"ceiling pg_drain {label}",
                lambda _r, size=size: ceilings.pg_drain(
                    servers, size, plan.backlog, plan.pg_drain_batch, plan.pg_drain_loops
                ),
            )
            add(f"pg_drain.{label}", f"pg.{label}", values, "rows/s")
        # (figure, ceiling key, function, chunk, unit): the plain client API, then the relay's path.
        senders = []
        if "kafka" in which and servers.kafka:
            senders += [
                ("kafka_produce", "kafka", ceilings.kafka_produce, plan.kafka_chunk, "msgs/s"),
                (
                    "kafka_produce_tuned",
                    "kafka_tuned",
                    ceilings.kafka_produce_tuned,
                    plan.kafka_chunk,
                    "msgs/s",
                ),
                (
                    "kafka_produce_batches",
                    "kafka_batches",
                    ceilings.kafka_produce_batches,
                    plan.kafka_chunk,
                    "msgs/s",
                ),
            ]
        if "redis" in which and servers.redis:
            senders += [
                ("redis_xadd", "redis", ceilings.redis_xadd, plan.redis_chunk, "entries/s"),
                ("redis_script", "redis_script", ceilings.redis_script, plan.redis_chunk, "entries/s"),
            ]
        for figure, key, send, chunk, unit in senders:
            values = await repeat(
                plan,
                f"ceiling {figure} {label}",
                lambda _r, send=send, size=size, chunk=chunk: send(servers, size, plan.raw_messages, chunk),
            )
            add(f"{figure}.{label}", f"{key}.{label}", values, unit)
    if "pipeline" in which:
        for label, size in workload.SIZES.items():
            for sink in ("kafka", "redis"):
                if not (servers.kafka if sink == "kafka" else servers.redis):
                    continue
                values = await repeat(
                    plan,
                    f"ceiling pipeline {sink} {label}",
                    lambda _r, sink=sink, size=size: ceilings.pipeline(
                        servers, sink, size, plan.backlog, plan.pg_drain_batch
                    ),
                )
                add(f"pipeline_{sink}.{label}", f"pipeline.{sink}.{label}", values, "events/s")
    if "writer" in which:
        best, best_concurrency = 0.0, 0
        for concurrency in plan.writer_concurrency:
            values = await repeat(
                plan,
                f"ceiling writer c={concurrency}",
                lambda _r, c=concurrency: ceilings.writer_commits(servers, c, plan.writer_seconds),
            )
            add(f"writer.c{concurrency}", f"writer.c{concurrency}", values, "commits/s")
            if out[f"writer.c{concurrency}"] > best:
                best, best_concurrency = out[f"writer.c{concurrency}"], concurrency
        out["writer"], out["writer.concurrency"] = best, best_concurrency
        results.add(Figure("ceiling.writer.best", best, "commits/s", "ceiling"))
        results.add(Figure("ceiling.writer.best_concurrency", best_concurrency, "tasks", "info"))
    results.note(
        "ceiling",
        f"pg_drain: {plan.pg_drain_loops} concurrent loops of DELETE ... WHERE id IN (SELECT id ... ORDER BY id"
        f" LIMIT {plan.pg_drain_batch} FOR UPDATE SKIP LOCKED) RETURNING <the relay's columns>, over a"
        f" {plan.backlog:,}-row backlog. kafka_produce: {plan.raw_messages:,} messages, send() {plan.kafka_chunk}"
        " then gather their futures, with the relay's producer settings (acks=all, linger 5 ms), to a fresh"
        " 8-partition topic. kafka_produce_tuned: the same with a producer tuned for throughput"
        " (max_batch_size 256 KiB, linger 5 ms): the drain's vs_tuned bar (>= 0.9; for Redis the bar is"
        f" redis_xadd, pipelined). redis_xadd: {plan.raw_messages:,} XADDs pipelined {plan.redis_chunk} at a time."
        " kafka_produce_batches and redis_script (not bars): the same messages sent the way the relay sends"
        " them, record batches built by the client (create_batch / send_batch, one per partition per chunk)"
        " and one call of the relay's XADD script per chunk: what the clients do beyond their plain API."
        " pipeline (not a bar, an explanation): 16 concurrent loops of that DELETE ... RETURNING 500 rows then"
        " publishing them (send + gather, or one XADD pipeline), i.e. the least a relay must do, with none of"
        " its guarantees, competing for the same CPUs as the relay does."
        " writer: single-event transactions through clients.aenqueue on asyncpg, as fast as possible for"
        f" {plan.writer_seconds:g} s at each concurrency; the best is the writer ceiling.",
    )
    return out


# --- 1. backlog drain -------------------------------------------------------------------------------


@dataclass
class DrainRun:
    rate: float
    relay_cpu: float  # CPU cores the relay processes used while draining
    postgres_cpu: float
    delivered: float  # records found in the sink / rows (NaN when not checked)
    machine_busy: float  # share of all the machine's cores busy while draining


async def drain_once(
    servers: Servers, plan: Plan, sink: str, size: int, instances: int, verify: bool, extra: dict[str, str]
) -> DrainRun:
    rows = plan.backlog
    async with fresh_schema(servers.db) as schema:
        conn = await asyncpg.connect(servers.db)
        topic = (
            await create_topic(servers.kafka, "bench.drain")
            if sink == "kafka"
            else f"bench.drain.{uuid.uuid4().hex[:10]}"
        )
        try:
            async with relays(servers, conn, schema, instances, sink, **extra) as fleet:
                await workload.bulk_insert(conn, schema, topic, rows, size)
                committed = time.monotonic()
                relay0, machine0 = relay_cpu_seconds(fleet), machine_cpu()
                pg0 = cpu_by_pid(postgres_processes(servers))
                emptied = await wait_drained(conn, schema, timeout=600, relays=fleet, every=0.025)
                elapsed = emptied - committed
                relay_cpu = (relay_cpu_seconds(fleet) - relay0) / elapsed
                pg_cpu = postgres_cpu_since(servers, pg0) / elapsed
                busy = machine_busy_since(machine0)
            if await dead_letters(conn, schema):
                raise BenchError(
                    f"drain {sink}: events were dead-lettered (see relay logs in {servers.logs})"
                )
            delivered = float("nan")
            if verify:
                found = (
                    await count_kafka_records(servers.kafka, topic, rows)
                    if sink == "kafka"
                    else await redis_stream_length(servers.redis, topic)
                )
                delivered = found / rows
        finally:
            await conn.close()
            if sink == "kafka":
                await delete_topic(servers.kafka, topic)
            else:
                await redis_delete(servers.redis, topic)
    return DrainRun(rows / elapsed, relay_cpu, pg_cpu, delivered, busy)


DRAIN_CONFIGS = (
    ("kafka", "200B", 1),
    ("kafka", "200B", 2),
    ("kafka", "4KiB", 1),
    ("redis", "200B", 1),
    ("redis", "200B", 2),
    ("redis", "4KiB", 1),
)


async def run_drain(
    servers: Servers, plan: Plan, results: Results, ceil: Ceilings, extra: dict[str, str] | None = None
) -> None:
    medians: dict[tuple[str, str, int], float] = {}
    for sink, label, instances in DRAIN_CONFIGS:
        if not (servers.kafka if sink == "kafka" else servers.redis):
            continue
        runs: list[DrainRun] = []
        for rep in range(plan.reps):
            run = await drain_once(
                servers, plan, sink, workload.SIZES[label], instances, verify=rep == 0, extra=extra or {}
            )
            log.info(
                "drain %s %s x%d rep %d/%d: %.0f events/s, relay %.2f cores, postgres %.2f cores",
                sink,
                label,
                instances,
                rep + 1,
                plan.reps,
                run.rate,
                run.relay_cpu,
                run.postgres_cpu,
            )
            runs.append(run)
        name = f"drain.{sink}.{label}.x{instances}"
        rates = [r.rate for r in runs]
        medians[(sink, label, instances)] = median(rates)
        raw = ceil.get(f"{sink}.{label}", float("nan"))
        results.add(Figure(f"{name}.events_per_s", median(rates), "events/s", "absolute", reps=rates))
        results.add(
            Figure(
                f"{name}.vs_raw",
                ratio(median(rates), raw),
                f"x raw {'produce' if sink == 'kafka' else 'XADD'}",
                bar=Bar(">=", 0.8),
                reps=[ratio(r, raw) for r in rates],
            )
        )
        # Issue 16's bar: a raw producer tuned for throughput (Kafka: 256 KiB batches, linger 5 ms;
        # Redis: XADD pipelined 2,000 deep, already the throughput-tuned form of the plain client).
        tuned = ceil.get(f"{'kafka_tuned' if sink == 'kafka' else 'redis'}.{label}", float("nan"))
        results.add(
            Figure(
                f"{name}.vs_tuned",
                ratio(median(rates), tuned),
                f"x raw {'produce, tuned' if sink == 'kafka' else 'XADD, pipelined'}",
                bar=Bar(">=", 0.9),
                reps=[ratio(r, tuned) for r in rates],
            )
        )
        pg_raw = ceil.get(f"pg.{label}", float("nan"))
        results.add(
            Figure(
                f"{name}.vs_pg_drain",
                ratio(median(rates), pg_raw),
                "x raw Postgres drain",
                "info",
                reps=[ratio(r, pg_raw) for r in rates],
            )
        )
        fast = ceil.get(f"{'kafka_batches' if sink == 'kafka' else 'redis_script'}.{label}", float("nan"))
        results.add(
            Figure(
                f"{name}.vs_raw_fast_path",
                ratio(median(rates), fast),
                f"x raw {'produce_batches' if sink == 'kafka' else 'script'}",
                "info",
                reps=[ratio(r, fast) for r in rates],
            )
        )
        pipe = ceil.get(f"pipeline.{sink}.{label}", float("nan"))
        results.add(
            Figure(
                f"{name}.vs_pipeline",
                ratio(median(rates), pipe),
                "x raw Postgres-to-sink loop",
                "info",
                reps=[ratio(r, pipe) for r in rates],
            )
        )
        cpu = [r.relay_cpu for r in runs]
        results.add(Figure(f"{name}.relay_cpu", median(cpu), "cores", "info", reps=cpu))
        busy = [r.machine_busy for r in runs]
        results.add(Figure(f"{name}.machine_busy", median(busy), "x all cores", "info", reps=busy))
        pg_cpu = [r.postgres_cpu for r in runs]
        results.add(Figure(f"{name}.postgres_cpu", median(pg_cpu), "cores", "info", reps=pg_cpu))
        results.add(
            Figure(
                f"{name}.delivered",
                runs[0].delivered,
                "x rows",
                "absolute",
                Bar(">=", 1.0),
                reps=[runs[0].delivered],
            )
        )
    for sink in ("kafka", "redis"):
        one, two = medians.get((sink, "200B", 1)), medians.get((sink, "200B", 2))
        if one and two:
            results.add(
                Figure(f"drain.{sink}.200B.x2_vs_x1", ratio(two, one), "x one instance", bar=Bar(">=", 1.0))
            )
    results.note(
        "drain",
        f"{plan.backlog:,} rows committed by one INSERT ... SELECT generate_series while the relay processes"
        " (`outbox-relay run`, default settings, 16 partitions) already run with their leases balanced;"
        " the clock runs from that commit until the outbox is empty. A fresh schema and a fresh 8-partition"
        " topic (or stream) per repetition. `delivered` counts the records read back from the topic/stream"
        " in the first repetition. relay_cpu / postgres_cpu: CPU cores used during the drain.",
    )


# --- 2. latency at steady load ----------------------------------------------------------------------


@dataclass
class LatencyRun:
    summary: dict[str, float]
    target: int
    committed: int
    received: int
    duplicates: int
    samples: list[tuple[float, float]] = field(repr=False)  # (arrival, latency)
    relay_cpu: float = float("nan")  # cores the relay used
    machine_busy: float = float("nan")  # share of all cores busy (relay, writers, servers, consumer)
    postgres_cpu: float = float("nan")  # cores the embedded Postgres used
    pickup: dict[str, float] = field(default_factory=dict)  # payload time -> producer append, ms
    broker: dict[str, float] = field(default_factory=dict)  # producer append -> consumer, ms
    broker_cpu_first: float = float("nan")  # cores the embedded broker used in the first window of the run
    broker_cpu_last: float = float("nan")  # ... and in the last one, at the same rate


class LatencyConsumer:
    """The consumer process (bench.consumer) for one fresh topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=consumer.run, args=(bootstrap, topic, child), daemon=True)
        self._process.start()

    async def ready(self, timeout: float = 60.0) -> None:
        if not await asyncio.to_thread(self._pipe.poll, timeout) or self._pipe.recv() != "ready":
            raise BenchError("latency consumer did not start")

    async def collect(
        self, expected: int, timeout: float
    ) -> tuple[list[tuple[int, float, float, float]], int, int]:
        """(samples, duplicates, per-key order violations) once `expected` distinct events arrived
        or `timeout` seconds passed."""
        self._pipe.send(("expect", expected, timeout))
        if not await asyncio.to_thread(self._pipe.poll, timeout + 30):
            raise BenchError("latency consumer did not answer")
        samples, duplicates, violations = self._pipe.recv()
        await asyncio.to_thread(self._process.join, 10)
        return samples, duplicates, violations

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()


async def latency_once(servers: Servers, plan: Plan, rate: int, listen: bool | None) -> LatencyRun:
    """listen True/False: relay with LISTEN/NOTIFY or polling only; None: the raw produce floor."""
    seconds = plan.latency_seconds if listen is not None else plan.floor_seconds
    warm = int(rate * plan.latency_warmup)
    topic = await create_topic(servers.kafka, "bench.latency")
    reader = LatencyConsumer(servers.kafka, topic)
    broker_cpu = CpuTrace(broker_process(servers))
    try:
        await reader.ready()
        if listen is None:
            relay_cpu = busy = pg_cpu = float("nan")
            producer = AIOKafkaProducer(**ceilings.producer_options(servers.kafka))
            await producer.start()
            try:
                await producer.partitions_for(topic)
                pending_acks: list[asyncio.Future[object]] = []

                async def produce(n: int) -> None:
                    pending_acks.append(
                        await producer.send(
                            topic,
                            workload.timed_payload(n, 200),
                            key=workload.key(n).encode(),
                            headers=workload.kafka_headers(),
                        )
                    )

                async with broker_cpu.running():
                    committed = await paced(rate, seconds + plan.latency_warmup, 1, produce)
                await asyncio.gather(*pending_acks)
            finally:
                await producer.stop()
        else:
            async with fresh_schema(servers.db) as schema:
                conn = await asyncpg.connect(servers.db)
                pool = await asyncpg.create_pool(servers.db, min_size=16, max_size=16)
                try:
                    extra = {} if listen else {"OUTBOX_LISTEN": "false"}
                    async with relays(servers, conn, schema, 1, "kafka", **extra) as fleet:

                        async def write(n: int) -> None:
                            async with pool.acquire() as c, c.transaction():
                                await aenqueue(
                                    c,
                                    topic,
                                    workload.timed_payload(n, 200),
                                    key=workload.key(n),
                                    schema=schema,
                                )

                        cpu0, machine0 = relay_cpu_seconds(fleet), machine_cpu()
                        pg0 = cpu_by_pid(postgres_processes(servers))
                        began = time.monotonic()
                        async with broker_cpu.running():
                            committed = await paced(rate, seconds + plan.latency_warmup, 16, write)
                        relay_cpu = (relay_cpu_seconds(fleet) - cpu0) / (time.monotonic() - began)
                        pg_cpu = postgres_cpu_since(servers, pg0) / (time.monotonic() - began)
                        busy = machine_busy_since(machine0)
                        await wait_drained(conn, schema, timeout=120, relays=fleet, every=0.1)
                finally:
                    await pool.close()
                    await conn.close()
        samples, duplicates, _ = await reader.collect(committed, timeout=15.0)
    finally:
        reader.kill()
        await delete_topic(servers.kafka, topic)
    # The first `warmup` seconds of events are not measured: connections, prepared statements and topic
    # metadata are set up then, and this scenario is about steady load.
    measured = [(arrived, latency, pickup) for n, arrived, latency, pickup in samples if n >= warm]
    return LatencyRun(
        summary=latency_summary([latency for _, latency, _ in measured]),
        target=int(rate * seconds),
        committed=committed - warm,
        received=len(measured),
        duplicates=duplicates,
        samples=[(arrived, latency) for arrived, latency, _ in measured],
        relay_cpu=relay_cpu,
        machine_busy=busy,
        postgres_cpu=pg_cpu,
        pickup=latency_summary([pickup for _, _, pickup in measured]),
        broker=latency_summary([latency - pickup for _, latency, pickup in measured]),
        broker_cpu_first=broker_cpu.first(),
        broker_cpu_last=broker_cpu.last(),
    )


LATENCY_BARS = {500: 25.0, 2000: 100.0}


async def run_latency(servers: Servers, plan: Plan, results: Results) -> None:
    if not servers.kafka:
        results.note("latency", "skipped: no Kafka")
        return
    floors: dict[int, float] = {}
    modes: tuple[tuple[str, bool | None], ...] = (("raw", None), ("listen", True), ("poll", False))
    for mode, listen in modes:
        for rate in plan.latency_rates:
            runs: list[LatencyRun] = []
            for rep in range(plan.reps):
                run = await latency_once(servers, plan, rate, listen)
                log.info(
                    "latency %s %d/s rep %d/%d: p50 %.1f p95 %.1f p99 %.1f max %.1f ms; %d/%d committed, %d received",
                    mode,
                    rate,
                    rep + 1,
                    plan.reps,
                    run.summary["p50"],
                    run.summary["p95"],
                    run.summary["p99"],
                    run.summary["max"],
                    run.committed,
                    run.target,
                    run.received,
                )
                runs.append(run)
            name = f"latency.{mode}.{rate}"
            for key in ("p50", "p95", "p99", "max"):
                values = [r.summary[key] for r in runs]
                bar = (
                    Bar("<=", LATENCY_BARS[rate])
                    if mode == "listen" and key == "p99" and rate in LATENCY_BARS
                    else None
                )
                results.add(Figure(f"{name}.{key}_ms", median(values), "ms", "absolute", bar, reps=values))
            for leg in ("pickup", "broker"):
                values = [getattr(r, leg)["p99"] for r in runs]
                results.add(Figure(f"{name}.{leg}_p99_ms", median(values), "ms", "info", reps=values))
            for window in ("first", "last"):
                values = [getattr(r, f"broker_cpu_{window}") for r in runs]
                results.add(
                    Figure(f"{name}.broker_cpu_{window}", median(values), "cores", "info", reps=values)
                )
            if mode != "raw":
                for key, unit in (
                    ("relay_cpu", "cores"),
                    ("postgres_cpu", "cores"),
                    ("machine_busy", "x all cores"),
                ):
                    values = [getattr(r, key) for r in runs]
                    results.add(Figure(f"{name}.{key}", median(values), unit, "info", reps=values))
            p99 = median([r.summary["p99"] for r in runs])
            if mode == "raw":
                floors[rate] = p99
            elif rate in floors:
                results.add(
                    Figure(f"{name}.p99_vs_raw", ratio(p99, floors[rate]), "x raw produce p99", "info")
                )
            achieved = [r.committed / r.target for r in runs]
            results.add(
                Figure(f"{name}.achieved_vs_target", median(achieved), "x target rate", "info", reps=achieved)
            )
            delivered = [ratio(r.received, r.committed) for r in runs]
            results.add(
                Figure(
                    f"{name}.delivered",
                    median(delivered),
                    "x committed",
                    "absolute",
                    Bar(">=", 1.0),
                    reps=delivered,
                )
            )
            label = {
                "raw": "raw produce (no relay)",
                "listen": "relay, LISTEN/NOTIFY",
                "poll": "relay, polling only",
            }[mode]
            if mode != "raw":
                results.series[f"{label}, {rate}/s (last repetition)"] = time_bins(runs[-1].samples, 1.0)
    results.note(
        "latency",
        f"Writers commit single-event transactions (clients.aenqueue, asyncpg, 16 connections) on an open-loop"
        f" schedule at each rate for {plan.latency_seconds:g} s; the payload carries the wall-clock time taken"
        " just before the INSERT (so the latency includes the INSERT and the COMMIT). A consumer in its own"
        " process (aiokafka, fetch_max_wait_ms=5) subtracts it from the arrival time. listen: relay defaults"
        " (LISTEN/NOTIFY on); poll: OUTBOX_LISTEN=false, OUTBOX_POLL_INTERVAL at its default (1 s). raw: an"
        f" aiokafka producer sends the same events at the same rate for {plan.floor_seconds:g} s (after the same"
        " warm-up) to a fresh topic: the floor the broker and the consumer set without any relay. Tansu's"
        " in-memory store slows down as a topic fills, so latency grows during a run even without the relay"
        " (see the plot); pickup_p99_ms isolates the relay's share. broker_cpu_first / broker_cpu_last: the"
        " cores the embedded broker used in the first and the last 2 s of the run, at the same rate: the"
        " broker's own cost per event growing as the topic fills, which leaves less of the machine to"
        " everything else and shows in broker_p99_ms (append to the producer's batch -> consumer).",
    )


# --- 3. keeping up ----------------------------------------------------------------------------------


async def keepup_once(servers: Servers, plan: Plan, concurrency: int) -> dict[str, float]:
    seconds = plan.keepup_seconds
    async with fresh_schema(servers.db) as schema:
        conn = await asyncpg.connect(servers.db)
        probe = await asyncpg.connect(servers.db)
        pool = await asyncpg.create_pool(servers.db, min_size=concurrency, max_size=concurrency)
        topic = await create_topic(servers.kafka, "bench.keepup")
        ages: list[float] = []
        try:
            async with relays(servers, conn, schema, 1, "kafka") as fleet:
                stop = asyncio.Event()

                async def sample() -> None:
                    while not stop.is_set():
                        ages.append(await oldest_pending_age(probe, schema))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)

                commits = 0
                counter = itertools.count()

                async def writer(deadline: float) -> None:
                    nonlocal commits
                    while time.monotonic() < deadline:
                        n = next(counter)
                        async with pool.acquire() as c, c.transaction():
                            await aenqueue(
                                c, topic, workload.payload(n, 200), key=workload.key(n), schema=schema
                            )
                        commits += 1

                sampler = asyncio.create_task(sample())
                started = time.monotonic()
                await asyncio.gather(*(writer(started + seconds) for _ in range(concurrency)))
                elapsed = time.monotonic() - started
                backlog_at_end = await pending(conn, schema)
                emptied = await wait_drained(conn, schema, timeout=300, relays=fleet, every=0.05)
                catch_up = emptied - (started + elapsed)
                stop.set()
                await sampler
        finally:
            await pool.close()
            await probe.close()
            await conn.close()
            await delete_topic(servers.kafka, topic)
    return {
        "max_age": max(ages) if ages else float("nan"),
        "commit_rate": commits / elapsed,
        "published_vs_committed": (commits - backlog_at_end) / commits if commits else float("nan"),
        "catch_up": catch_up,
    }


async def run_keepup(servers: Servers, plan: Plan, results: Results, ceil: Ceilings) -> None:
    if not servers.kafka:
        results.note("keepup", "skipped: no Kafka")
        return
    concurrency = int(ceil.get("writer.concurrency") or 8)
    runs = []
    for rep in range(plan.reps):
        run = await keepup_once(servers, plan, concurrency)
        log.info(
            "keepup rep %d/%d: max oldest age %.3f s at %.0f commits/s; %.3f published",
            rep + 1,
            plan.reps,
            run["max_age"],
            run["commit_rate"],
            run["published_vs_committed"],
        )
        runs.append(run)

    def values(key: str) -> list[float]:
        return [r[key] for r in runs]

    results.add(
        Figure(
            "keepup.oldest_age_max_s",
            median(values("max_age")),
            "s",
            "absolute",
            Bar("<", 1.0),
            reps=values("max_age"),
        )
    )
    results.add(
        Figure(
            "keepup.commits_per_s",
            median(values("commit_rate")),
            "commits/s",
            "absolute",
            reps=values("commit_rate"),
        )
    )
    writer = ceil.get("writer", float("nan"))
    results.add(
        Figure(
            "keepup.commits_vs_writer_ceiling",
            ratio(median(values("commit_rate")), writer),
            "x writer ceiling",
            reps=[ratio(v, writer) for v in values("commit_rate")],
        )
    )
    results.add(
        Figure(
            "keepup.published_vs_committed",
            median(values("published_vs_committed")),
            "x committed",
            "ratio",
            reps=values("published_vs_committed"),
        )
    )
    results.add(
        Figure("keepup.catch_up_s", median(values("catch_up")), "s", "absolute", reps=values("catch_up"))
    )
    results.note(
        "keepup",
        f"{concurrency} writers (the writer-ceiling concurrency) commit single-event transactions as fast as"
        f" they can for {plan.keepup_seconds:g} s while one relay process publishes to Kafka; the age of the"
        " oldest pending row is sampled every 0.5 s. published_vs_committed: share of the committed events"
        " already published when the writers stop; catch_up_s: from then until the outbox is empty.",
    )


# --- 4. memory --------------------------------------------------------------------------------------


async def memory_once(servers: Servers, plan: Plan) -> dict[str, float]:
    rows = plan.memory_backlog
    async with fresh_schema(servers.db) as schema:
        conn = await asyncpg.connect(servers.db)
        probe = await asyncpg.connect(servers.db)
        topic = await create_topic(servers.kafka, "bench.memory")
        try:
            async with relays(servers, conn, schema, 1, "kafka") as fleet:
                process = psutil.Process(fleet.pids[0])
                await asyncio.sleep(1.0)
                idle = process.memory_info().rss / 2**20
                rss: list[tuple[float, float]] = []
                progress: list[tuple[float, float]] = []
                stop = asyncio.Event()

                async def sample_rss() -> None:
                    while not stop.is_set():
                        rss.append((time.monotonic(), process.memory_info().rss / 2**20))
                        await asyncio.sleep(0.1)

                sampler = asyncio.create_task(sample_rss())
                await workload.bulk_insert(conn, schema, topic, rows, workload.SIZES["200B"])
                elapsed = await drain_with_progress(fleet, probe, schema, rows, progress, 900, "memory")
                await asyncio.sleep(0.3)
                stop.set()
                await sampler
        finally:
            await probe.close()
            await conn.close()
            await delete_topic(servers.kafka, topic)
    out = {"idle": idle, "peak": max(v for _, v in rss), "rate": rows / elapsed}
    for pct in (25, 50, 75, 100):
        out[f"at_{pct}"] = value_at_fraction(progress, rss, pct / 100)
    return out


async def run_memory(servers: Servers, plan: Plan, results: Results) -> None:
    if not servers.kafka:
        results.note("memory", "skipped: no Kafka")
        return
    runs = []
    for rep in range(plan.reps):
        run = await memory_once(servers, plan)
        log.info("memory rep %d/%d: %s", rep + 1, plan.reps, {k: round(v, 1) for k, v in run.items()})
        runs.append(run)

    def values(key: str) -> list[float]:
        return [r[key] for r in runs]

    results.add(
        Figure(
            "memory.peak_rss_mb",
            median(values("peak")),
            "MiB",
            "absolute",
            Bar("<=", 150),
            reps=values("peak"),
        )
    )
    results.add(Figure("memory.idle_rss_mb", median(values("idle")), "MiB", "absolute", reps=values("idle")))
    for pct in (25, 50, 75, 100):
        results.add(
            Figure(
                f"memory.rss_at_{pct}pct_mb",
                median(values(f"at_{pct}")),
                "MiB",
                "absolute",
                reps=values(f"at_{pct}"),
            )
        )
    growth = [ratio(r["at_100"], r["at_25"]) for r in runs]
    results.add(
        Figure("memory.rss_100_vs_25pct", median(growth), "x RSS at 25 %", bar=Bar("<=", 1.1), reps=growth)
    )
    results.add(
        Figure("memory.events_per_s", median(values("rate")), "events/s", "absolute", reps=values("rate"))
    )
    results.note(
        "memory",
        f"One relay process (Kafka sink, defaults) drains a {plan.memory_backlog:,}-row backlog of 200-byte"
        " events committed while it runs; psutil samples its RSS every 0.1 s and the outbox is counted every"
        " 0.5 s. rss_at_N: the last RSS sample when N % of the backlog was gone. Flat means RSS at 100 % is"
        " within 10 % of RSS at 25 %.",
    )


# --- 4b. memory with large events --------------------------------------------------------------------

LARGE_MEMORY_BAR_MB = 512  # deploy/kubernetes/deployment.yaml: limits.memory 512Mi


def _default_mib(field: str) -> str:
    return f"{RelaySettings.model_fields[field].default / 2**20:g} MiB"


async def memory_large_once(servers: Servers, plan: Plan, verify: bool, **extra: str) -> dict[str, float]:
    """One relay process (Kafka, defaults) drains a backlog of large events many times its memory
    limit: the claim and in-flight byte budgets must keep its RSS flat."""
    rows, size = plan.large_backlog, plan.large_size
    async with fresh_schema(servers.db) as schema:
        conn = await asyncpg.connect(servers.db)
        probe = await asyncpg.connect(servers.db)
        topic = await create_topic(servers.kafka, "bench.memlarge")
        try:
            async with relays(servers, conn, schema, 1, "kafka", **extra) as fleet:
                process = psutil.Process(fleet.pids[0])
                await asyncio.sleep(1.0)
                idle = process.memory_info().rss / 2**20
                rss: list[tuple[float, float]] = []
                progress: list[tuple[float, float]] = []
                stop = asyncio.Event()

                async def sample_rss() -> None:
                    while not stop.is_set():
                        with contextlib.suppress(psutil.Error):
                            rss.append((time.monotonic(), process.memory_info().rss / 2**20))
                        await asyncio.sleep(0.1)

                sampler = asyncio.create_task(sample_rss())
                inserted = await workload.bulk_insert_large(conn, schema, topic, rows, size)
                log.info(
                    "memory_large: %d events of %d KiB committed in %.0f s", rows, size // 1024, inserted
                )
                elapsed = await drain_with_progress(fleet, probe, schema, rows, progress, 1800, "memory_large")
                await asyncio.sleep(0.3)
                stop.set()
                await sampler
            if await dead_letters(conn, schema):
                raise BenchError(
                    f"memory_large: events were dead-lettered (see relay logs in {servers.logs})"
                )
            delivered = (
                await count_kafka_records(servers.kafka, topic, rows) / rows if verify else float("nan")
            )
        finally:
            await probe.close()
            await conn.close()
            await delete_topic(servers.kafka, topic)
    out = {
        "idle": idle,
        "peak": max(v for _, v in rss),
        "rate": rows / elapsed,
        "mib_per_s": rows * size / 2**20 / elapsed,
        "delivered": delivered,
    }
    for pct in (25, 50, 75, 100):
        out[f"at_{pct}"] = value_at_fraction(progress, rss, pct / 100)
    return out


async def run_memory_large(servers: Servers, plan: Plan, results: Results) -> None:
    if not servers.kafka:
        results.note("memory_large", "skipped: no Kafka")
        return
    runs = []
    for rep in range(plan.reps):
        run = await memory_large_once(servers, plan, verify=rep == 0)
        log.info("memory_large rep %d/%d: %s", rep + 1, plan.reps, {k: round(v, 2) for k, v in run.items()})
        runs.append(run)

    def values(key: str) -> list[float]:
        return [r[key] for r in runs]

    backlog_mib = plan.large_backlog * plan.large_size / 2**20
    results.add(
        Figure(
            "memory_large.peak_rss_mb",
            median(values("peak")),
            "MiB",
            "absolute",
            Bar("<=", LARGE_MEMORY_BAR_MB),
            reps=values("peak"),
        )
    )
    results.add(
        Figure("memory_large.idle_rss_mb", median(values("idle")), "MiB", "absolute", reps=values("idle"))
    )
    results.add(
        Figure(
            "memory_large.rss_at_100pct_mb",
            median(values("at_100")),
            "MiB",
            "absolute",
            reps=values("at_100"),
        )
    )
    results.add(
        Figure(
            "memory_large.peak_vs_backlog",
            ratio(median(values("peak")), backlog_mib),
            "x backlog size",
            "info",
            reps=[ratio(v, backlog_mib) for v in values("peak")],
        )
    )
    results.add(
        Figure(
            "memory_large.delivered",
            runs[0]["delivered"],
            "x rows (first repetition)",
            bar=Bar(">=", 1.0),
        )
    )
    results.add(
        Figure(
            "memory_large.events_per_s", median(values("rate")), "events/s", "absolute", reps=values("rate")
        )
    )
    results.add(
        Figure(
            "memory_large.mib_per_s",
            median(values("mib_per_s")),
            "MiB/s",
            "absolute",
            reps=values("mib_per_s"),
        )
    )
    results.note(
        "memory_large",
        f"One relay process (Kafka sink, defaults: OUTBOX_CLAIM_MAX_BYTES {_default_mib('claim_max_bytes')},"
        f" OUTBOX_INFLIGHT_MAX_BYTES {_default_mib('inflight_max_bytes')}) drains a backlog of {plan.large_backlog:,} events of {plan.large_size // 1024} KiB"
        f" ({backlog_mib:,.0f} MiB, incompressible JSON) committed by one statement while it runs; psutil"
        " samples its RSS every 0.1 s. The bar is the 512 MiB memory limit of deploy/kubernetes. delivered:"
        " records read back from the topic / rows, first repetition.",
    )


# --- 5. database cost -------------------------------------------------------------------------------


async def dbcost_once(servers: Servers, plan: Plan, batch: int) -> dict[str, float]:
    rows = plan.dbcost_rows
    async with fresh_schema(servers.db) as schema:
        conn = await asyncpg.connect(servers.db)
        topic = await create_topic(servers.kafka, "bench.dbcost")
        try:
            async with relays(servers, conn, schema, 1, "kafka", OUTBOX_BATCH_SIZE=str(batch)) as fleet:
                await conn.execute("/* bench */ SELECT pg_stat_statements_reset()")
                await workload.bulk_insert(conn, schema, topic, rows, workload.SIZES["200B"])
                await wait_drained(conn, schema, timeout=300, relays=fleet, every=0.05)
                records = await conn.fetch(
                    "/* bench */ SELECT query, calls FROM pg_stat_statements"
                    " WHERE (query LIKE '%' || $1 || '%' AND query NOT LIKE '%benchprobe%')"
                    # asyncpg's pool runs this reset on every release; only the relay uses a pool here.
                    " OR query LIKE '%pg_advisory_unlock_all()%'",
                    schema,
                )
        finally:
            await conn.close()
            await delete_topic(servers.kafka, topic)
    total = sum(int(r["calls"]) for r in records)
    claims = sum(int(r["calls"]) for r in records if "SKIP LOCKED" in r["query"])
    settles = sum(
        int(r["calls"])
        for r in records
        if r["query"].lstrip().startswith("DELETE") and "ANY ($1" in r["query"]
    )
    resets = sum(int(r["calls"]) for r in records if "pg_advisory_unlock_all()" in r["query"])
    return {
        "statements_per_event": total / rows,
        "pool_resets_per_event": resets / rows,
        "claims_per_event": claims / rows,
        "settles_per_event": settles / rows,
        "rows_per_claim": ratio(rows, claims),
    }


async def run_dbcost(servers: Servers, plan: Plan, results: Results) -> None:
    if not servers.kafka:
        results.note("dbcost", "skipped: no Kafka")
        return
    conn = await asyncpg.connect(servers.db)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
    except asyncpg.PostgresError as exc:
        results.note("dbcost", f"skipped: pg_stat_statements is not available ({exc})")
        return
    finally:
        await conn.close()
    per_batch: dict[int, float] = {}
    for batch in plan.dbcost_batches:
        runs = []
        for rep in range(plan.reps):
            run = await dbcost_once(servers, plan, batch)
            log.info(
                "dbcost batch %d rep %d/%d: %s",
                batch,
                rep + 1,
                plan.reps,
                {k: round(v, 4) for k, v in run.items()},
            )
            runs.append(run)
        for key, unit in (
            ("statements_per_event", "statements/event"),
            ("claims_per_event", "claims/event"),
            ("pool_resets_per_event", "resets/event"),
            ("rows_per_claim", "rows/claim"),
        ):
            values = [r[key] for r in runs]
            results.add(
                Figure(
                    f"dbcost.batch{batch}.{key}",
                    median(values),
                    unit,
                    "absolute",
                    reps=values,
                )
            )
        per_batch[batch] = median([r["statements_per_event"] for r in runs])
    smallest = min(per_batch)
    for batch in sorted(per_batch)[1:]:
        results.add(
            Figure(
                f"dbcost.batch{batch}_vs_batch{smallest}",
                ratio(per_batch[batch], per_batch[smallest]),
                f"x statements/event at batch {smallest}",
                bar=Bar("<", 1.0),
            )
        )
    results.note(
        "dbcost",
        f"pg_stat_statements reset, then {plan.dbcost_rows:,} rows committed by one statement and drained by"
        " one relay process with OUTBOX_BATCH_SIZE set; the calls of every statement naming the bench schema"
        " (claims, settles, lease renewals, heartbeats, pause polls, idle polls...) are summed, excluding the"
        " bench's own statements, plus the session reset (`SELECT pg_advisory_unlock_all(); CLOSE ALL;"
        " UNLISTEN *; RESET ALL`) asyncpg's pool sends each time a connection goes back to the pool. rows_per_claim averages over every claim, empty idle polls included.",
    )


async def drain_with_progress(
    fleet: Fleet, probe: Any, schema: str, rows: int, progress: list[tuple[float, float]], limit: float, what: str
) -> float:
    """Waits for the backlog to drain, recording the fraction done over time; returns the seconds taken."""
    committed = time.monotonic()
    while True:
        fleet.check_alive()
        left = await pending(probe, schema)
        progress.append((time.monotonic(), 1 - left / rows))
        if left == 0:
            return time.monotonic() - committed
        if time.monotonic() - committed > limit:
            raise BenchError(f"{what}: backlog not drained in {limit:.0f} s")
        await asyncio.sleep(0.5)
