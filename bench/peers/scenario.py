"""Scenario 6, the peers (`--peers`): Outbox Relay and other outbox relays on the same workload, the
same servers and the same consumer (bench.consumer), one after the other within each repetition.

For every relay: a fresh schema and a fresh 8-partition topic per run; its relay as its own process;
(a) backlog drain: `backlog` events of 200 bytes committed in one transaction through the relay's own
writer API while the relay runs, the clock running from that commit until the consumer has read the
last of them; (b) latency: single-event commits through its writer API at `rate`/s (16 connections,
open loop) for `seconds` after a warm-up, commit-to-consumer latency of every event. Both count lost
events, duplicates and per-key order violations at the consumer, and the relay process's CPU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncpg
import psutil

from bench.peers import venv
from bench.plan import Plan
from bench.report import Bar, Figure, Results
from bench.scenarios import LatencyConsumer
from bench.stack import (
    BenchError,
    CpuTrace,
    Servers,
    broker_process,
    cpu_seconds,
    create_topic,
    delete_topic,
    fresh_schema,
    relay_cpu_seconds,
    relays,
)
from bench.stats import latency_summary, median, ratio

log = logging.getLogger("bench")
T = TypeVar("T")

OURS = "outbox-relay"
OUR_RUNNER = "bench.peers.outbox_relay_runner"
WRITER_TASKS = 16

SETTINGS = {
    OURS: "defaults (`outbox-relay run`, LISTEN/NOTIFY on, 16 partitions, one process); writer clients.aenqueue (asyncpg)",
    "txoutbox": "PostgresStorage (asyncpg) with notify_channel + listen(relay.wake); RelayConfig defaults"
    " (batch_size 50, concurrency 10, strict ordering); publisher: aiokafka send_and_wait per message"
    " (producer defaults); writer storage.insert(conn, ...)",
    "faststream-outbox": "OutboxBroker on asyncpg (LISTEN/NOTIFY) relaying to a KafkaBroker publisher;"
    " subscriber max_workers=1 (per-key order), fetch_batch_size=100, terminal_flush_batch_size=100,"
    " min_fetch_interval=0.1, max_fetch_interval=1.0; writer broker.publish(..., session=session)",
    "omni-box": "the README's publisher loop: OutboxPublisher.publish_batch(batch_size=100) in a transaction"
    " per cycle, 1 s sleep when idle (no LISTEN); KafkaEventPublisher (send_and_wait per event,"
    " acks=all, no idempotence: Tansu), RawEventConverter; writer PostgresOutboxRepository.create(event)",
}


def parse_emitted(stdout: str) -> dict[str, object]:
    """The JSON object a runner prints on its last non-empty stdout line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise BenchError("peer runner printed nothing")
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise BenchError(f"peer runner printed {lines[-1][:200]!r}, not JSON") from exc
    if not isinstance(value, dict):
        raise BenchError(f"peer runner printed {value!r}, not an object")
    return value


@dataclass
class Contender:
    name: str
    python: Path
    runner: str
    version: str

    @property
    def ours(self) -> bool:
        return self.name == OURS


@dataclass
class Run:
    """One drain or latency run of one relay."""

    expected: int  # events committed
    received: int  # distinct events the consumer read
    duplicates: int
    violations: int
    cpu_ms_per_1k: float  # relay CPU ms per 1,000 events
    rate: float = float("nan")  # drain: events/s
    summary: dict[str, float] = field(default_factory=dict)  # latency: p50/p95/p99/max ms
    # latency, split at the record's CreateTime, which aiokafka stamps as the relay hands the event to
    # its producer (every contender uses aiokafka and leaves the timestamp to it): the relay's share
    # (commit, wake-up, claim, hand-over) and the rest (produce request, broker, consumer fetch)
    pickup: dict[str, float] = field(default_factory=dict)
    broker: dict[str, float] = field(default_factory=dict)
    # latency: the writer's own part of the pickup, from the payload's time until its COMMIT returned
    # (p50, p99 ms). It counts in the pickup, and on a machine the workload saturates it grows with
    # whatever else wants the cores, the relay included.
    commit: dict[str, float] = field(default_factory=dict)
    # latency: the embedded broker's cores while the writers ran (median of CpuTrace's windows): how
    # hard each relay's way of producing makes the shared broker work
    broker_cores: float = float("nan")
    achieved: float = float("nan")  # latency: committed / target

    @property
    def lost(self) -> int:
        return max(self.expected - self.received, 0)


class PeerProcess:
    """A runner command as a child process of the peers' (or the bench's) Python."""

    def __init__(self, contender: Contender, servers: Servers, schema: str, topic: str, logs: Path) -> None:
        self.contender = contender
        root = str(venv.ROOT)
        self.env = {
            **os.environ,
            "PYTHONPATH": root,
            "PEER_DSN": servers.db,
            "PEER_BOOTSTRAP": servers.kafka,
            "PEER_TOPIC": topic,
            "PEER_SCHEMA": schema,
        }
        self.logs = logs

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        stderr = (self.logs / f"{self.contender.name}-{args[0]}-{uuid.uuid4().hex[:6]}.log").open("wb")
        try:
            return await asyncio.create_subprocess_exec(
                str(self.contender.python),
                "-m",
                self.contender.runner,
                *args,
                cwd=str(venv.ROOT),
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        finally:
            stderr.close()

    async def call(self, *args: str, timeout: float) -> dict[str, object]:
        process = await self.start(*args)
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BenchError(f"{self.contender.name} {args[0]} took over {timeout:.0f} s") from None
        if process.returncode != 0:
            raise BenchError(
                f"{self.contender.name} {args[0]} exited {process.returncode} (stderr in {self.logs})"
            )
        return parse_emitted(stdout.decode())


@contextlib.asynccontextmanager
async def peer_relay(runner: PeerProcess, timeout: float = 120) -> AsyncIterator[list[psutil.Process]]:
    """The peer's relay process, started and ready; SIGTERM (then SIGKILL after 20 s) on exit.
    Yields the processes whose CPU counts (the relay and any children)."""
    process = await runner.start("relay")
    drain: asyncio.Task[bytes] | None = None
    try:
        assert process.stdout is not None
        if not await asyncio.wait_for(_ready(process.stdout), timeout):
            raise BenchError(f"{runner.contender.name} relay did not start (stderr in {runner.logs})")
        # Past "ready", stdout is drained so a peer that logs there (FastStream does) never blocks on it.
        drain = asyncio.create_task(process.stdout.read())
        root = psutil.Process(process.pid)
        yield [root, *root.children(recursive=True)]
        if process.returncode is not None:
            raise BenchError(f"{runner.contender.name} relay exited {process.returncode} during the run")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        if drain is not None:
            drain.cancel()


async def _ready(stdout: asyncio.StreamReader) -> bool:
    """Reads lines until the runner's {"ready": true} (other lines are the peer's own logging)."""
    while line := await stdout.readline():
        with contextlib.suppress(BenchError):
            if parse_emitted(line.decode()).get("ready") is True:
                return True
    return False


@contextlib.asynccontextmanager
async def running(
    contender: Contender, servers: Servers, topic: str
) -> AsyncIterator[tuple[PeerProcess, list[psutil.Process], object]]:
    """A fresh schema set up the relay's own way and its relay running: (runner, processes, fleet)."""
    if contender.ours:
        async with fresh_schema(servers.db) as schema:
            conn = await asyncpg.connect(servers.db)
            try:
                async with relays(servers, conn, schema, 1, "kafka") as fleet:
                    yield PeerProcess(contender, servers, schema, topic, servers.logs), [], fleet
            finally:
                await conn.close()
        return
    schema = f"peer_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(servers.db)
    try:
        await conn.execute(f'/* bench */ CREATE SCHEMA "{schema}"')
        runner = PeerProcess(contender, servers, schema, topic, servers.logs)
        await runner.call("setup", timeout=120)
        async with peer_relay(runner) as processes:
            yield runner, processes, None
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f'/* bench */ DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def _cpu(processes: list[psutil.Process], fleet: object) -> float:
    return relay_cpu_seconds(fleet) if fleet is not None else cpu_seconds(processes)  # type: ignore[arg-type]


async def drain_once(contender: Contender, servers: Servers, plan: Plan) -> Run:
    count = plan.peers_backlog
    topic = await create_topic(servers.kafka, "bench.peers")
    reader = LatencyConsumer(servers.kafka, topic)
    try:
        await reader.ready()
        async with running(contender, servers, topic) as (runner, processes, fleet):
            process = await runner.start("backlog", str(count), "200")
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 1800)
            cpu0 = _cpu(processes, fleet)  # the relay's CPU from (about) the commit on
            stdout = line + await process.stdout.read()
            if await process.wait() != 0:
                raise BenchError(
                    f"{contender.name} backlog exited {process.returncode} (stderr in {servers.logs})"
                )
            committed_at = float(parse_emitted(stdout.decode())["committed_at"])  # type: ignore[arg-type]
            samples, duplicates, violations = await reader.collect(count, timeout=plan.peers_timeout)
            cpu = _cpu(processes, fleet) - cpu0
    finally:
        reader.kill()
        await delete_topic(servers.kafka, topic)
    last = max((arrived for _, arrived, _, _ in samples), default=float("nan"))
    return Run(
        expected=count,
        received=len(samples),
        duplicates=duplicates,
        violations=violations,
        cpu_ms_per_1k=ratio(cpu * 1e6, len(samples)),
        rate=ratio(len(samples), last - committed_at) if len(samples) == count else float("nan"),
    )


def commit_times(wrote: dict[str, object]) -> dict[str, float]:
    """The writer's commit p50 and p99 (ms) as its `write` reported them; NaN where it did not."""
    values = {q: wrote.get(f"commit_{q}_ms") for q in ("p50", "p99")}
    return {q: float(v) if isinstance(v, int | float) else math.nan for q, v in values.items()}


async def latency_once(contender: Contender, servers: Servers, plan: Plan) -> Run:
    rate, seconds, warmup = plan.peers_rate, plan.peers_latency_seconds, plan.latency_warmup
    warm = int(rate * warmup)
    topic = await create_topic(servers.kafka, "bench.peers")
    reader = LatencyConsumer(servers.kafka, topic)
    try:
        await reader.ready()
        async with running(contender, servers, topic) as (runner, processes, fleet):
            cpu0 = _cpu(processes, fleet)
            async with CpuTrace(broker_process(servers)).running() as broker_cpu:
                wrote = await runner.call(
                    "write",
                    str(rate),
                    str(seconds + warmup),
                    str(WRITER_TASKS),
                    str(warm),
                    timeout=seconds + warmup + 300,
                )
            cpu = _cpu(processes, fleet) - cpu0
            committed = int(wrote["committed"])  # type: ignore[call-overload]
            samples, duplicates, violations = await reader.collect(committed, timeout=plan.peers_timeout)
    finally:
        reader.kill()
        await delete_topic(servers.kafka, topic)
    measured = [(latency, pickup) for n, _, latency, pickup in samples if n >= warm]
    return Run(
        expected=committed,
        received=len(samples),
        duplicates=duplicates,
        violations=violations,
        cpu_ms_per_1k=ratio(cpu * 1e6, committed),
        summary=latency_summary([latency for latency, _ in measured]),
        pickup=latency_summary([pickup for _, pickup in measured]),
        broker=latency_summary([latency - pickup for latency, pickup in measured]),
        commit=commit_times(wrote),
        broker_cores=median(broker_cpu.windows) if broker_cpu.windows else float("nan"),
        achieved=ratio(committed, rate * (seconds + warmup)),
    )


def in_turn(everyone: list[T], rep: int) -> list[T]:
    """Everyone, the first of them changing with each repetition: whoever runs first after another
    scenario (or another relay's process) does not always pay for it."""
    first = rep % len(everyone) if everyone else 0
    return everyone[first:] + everyone[:first]


def contenders(peers: venv.PeersEnv) -> list[Contender]:
    from bench.report import library_versions

    out = [Contender(OURS, Path(sys.executable), OUR_RUNNER, library_versions([OURS])[OURS])]
    for peer in peers.available:
        assert peers.python is not None
        out.append(Contender(peer, peers.python, venv.PEERS[peer][2], peers.versions[peer]))
    return out


async def run_peers(servers: Servers, plan: Plan, results: Results) -> None:
    if not servers.kafka:
        results.note("peers", "skipped: no Kafka")
        return
    peers = await asyncio.to_thread(venv.ensure)
    for peer, reason in peers.skipped.items():
        results.note("peers", f"{peer}: skipped ({reason})")
        results.errors.append(f"peers: {peer} skipped: {reason}")
    everyone = contenders(peers)
    for contender in everyone:
        results.peers[contender.name] = f"{contender.version}; {SETTINGS[contender.name]}"
    if peers.python is not None:
        results.machine["peers' venv"] = (
            f"{peers.python} (Python {'.'.join(map(str, venv.python_version(str(peers.python)) or ()))});"
            f" {venv.library_versions(peers.python)}"
        )
    drains: dict[str, list[Run]] = {c.name: [] for c in everyone}
    latencies: dict[str, list[Run]] = {c.name: [] for c in everyone}
    failed: set[str] = set()
    for rep in range(plan.reps):
        for contender in in_turn(everyone, rep):
            if contender.name in failed:
                continue
            try:
                run = await drain_once(contender, servers, plan)
                log.info(
                    "peers %s drain rep %d/%d: %.0f events/s, %.1f ms CPU/1k, lost %d, dup %d, order %d",
                    contender.name,
                    rep + 1,
                    plan.reps,
                    run.rate,
                    run.cpu_ms_per_1k,
                    run.lost,
                    run.duplicates,
                    run.violations,
                )
                drains[contender.name].append(run)
                run = await latency_once(contender, servers, plan)
                log.info(
                    "peers %s latency %d/s rep %d/%d: p50 %.1f p99 %.1f max %.1f ms, %.1f ms CPU/1k, lost %d, dup %d, order %d",
                    contender.name,
                    plan.peers_rate,
                    rep + 1,
                    plan.reps,
                    run.summary["p50"],
                    run.summary["p99"],
                    run.summary["max"],
                    run.cpu_ms_per_1k,
                    run.lost,
                    run.duplicates,
                    run.violations,
                )
                latencies[contender.name].append(run)
            except Exception as exc:  # one peer failing must not cost the others' figures
                log.exception("peers: %s failed", contender.name)
                results.errors.append(f"peers: {contender.name}: {type(exc).__name__}: {exc}")
                failed.add(contender.name)
    add_figures(results, plan, drains, latencies)
    results.note(
        "peers",
        f"Each relay in turn, within each repetition (the first one changing from one repetition to the"
        f" next), on the same embedded servers: a fresh schema set up"
        f" its own way and a fresh 8-partition topic per run, its relay as one process, its own writer API."
        f" Drain: {plan.peers_backlog:,} events of 200 bytes committed in one transaction while the relay"
        " runs; the clock runs from the commit until the consumer (bench.consumer, its own process) has read"
        f" the last of them. Latency: single-event commits at {plan.peers_rate}/s from {WRITER_TASKS}"
        f" connections (open loop) for {plan.peers_latency_seconds:g} s after a {plan.latency_warmup:g} s"
        " warm-up; the payload carries the wall-clock time taken before the INSERT. cpu_ms_per_1k: CPU"
        " time of the relay process per 1,000 events (drain: from the commit until the last event was read;"
        " latency: while the writers ran). lost / duplicates / order_violations are counted at the consumer"
        " (order: an event of a key read after a later event of the same key). pickup: from the payload's"
        " time to the record's CreateTime, which aiokafka stamps as the relay hands the event to its"
        " producer (every relay here leaves the timestamp to aiokafka; ms resolution): the relay's share,"
        " with the writer's own commit in it. commit: from the payload's time until the writer's COMMIT"
        " returned, the part of pickup before the relay can see the event; on a saturated machine it grows"
        " with whatever else wants the cores."
        " broker: the rest (produce request, broker, consumer fetch), the same broker and consumer for all."
        " broker_cores: the embedded broker's CPU while the writers ran (median of 2 s windows).",
    )


PEER_FIGURES = (
    # (figure suffix, unit)
    ("drain.events_per_s", "events/s"),
    ("drain.cpu_ms_per_1k", "ms CPU"),
    ("latency.p50_ms", "ms"),
    ("latency.p99_ms", "ms"),
    ("latency.max_ms", "ms"),
    ("latency.commit_p50_ms", "ms"),
    ("latency.commit_p99_ms", "ms"),
    ("latency.pickup_p50_ms", "ms"),
    ("latency.pickup_p99_ms", "ms"),
    ("latency.broker_p99_ms", "ms"),
    ("latency.broker_cores", "cores"),
    ("latency.cpu_ms_per_1k", "ms CPU"),
    ("lost", "events"),
    ("duplicates", "events"),
    ("order_violations", "events"),
)


def paired_ratios(ours: list[Run], theirs: list[Run], key: str) -> list[float]:
    """Our latency percentile `key` over theirs, per repetition: within one, every relay runs in turn
    minutes apart, so a ratio compares runs on the machine in much the same state, which the ratio
    of medians over repetitions (the figure itself) does not when the machine's speed drifts."""
    return [ratio(mine.summary[key], other.summary[key]) for mine, other in zip(ours, theirs, strict=False)]


def add_figures(
    results: Results, plan: Plan, drains: dict[str, list[Run]], latencies: dict[str, list[Run]]
) -> None:
    for name in drains:
        d, lat = drains[name], latencies[name]
        if not d and not lat:
            continue
        values = {
            "drain.events_per_s": [r.rate for r in d],
            "drain.cpu_ms_per_1k": [r.cpu_ms_per_1k for r in d],
            "latency.p50_ms": [r.summary["p50"] for r in lat],
            "latency.p99_ms": [r.summary["p99"] for r in lat],
            "latency.max_ms": [r.summary["max"] for r in lat],
            "latency.commit_p50_ms": [r.commit.get("p50", float("nan")) for r in lat],
            "latency.commit_p99_ms": [r.commit.get("p99", float("nan")) for r in lat],
            "latency.pickup_p50_ms": [r.pickup["p50"] for r in lat],
            "latency.pickup_p99_ms": [r.pickup["p99"] for r in lat],
            "latency.broker_p99_ms": [r.broker["p99"] for r in lat],
            "latency.broker_cores": [r.broker_cores for r in lat],
            "latency.cpu_ms_per_1k": [r.cpu_ms_per_1k for r in lat],
        }
        totals = {
            "lost": [float(r.lost) for r in d + lat],
            "duplicates": [float(r.duplicates) for r in d + lat],
            "order_violations": [float(r.violations) for r in d + lat],
        }
        for suffix, unit in PEER_FIGURES:
            if suffix in values:
                results.add(
                    Figure(
                        f"peers.{name}.{suffix}",
                        median(values[suffix]),
                        unit,
                        "absolute",
                        reps=values[suffix],
                    )
                )
            else:
                bar = Bar("<=", 0) if name == OURS else None
                results.add(
                    Figure(
                        f"peers.{name}.{suffix}",
                        sum(totals[suffix]),
                        f"{unit}, all runs",
                        "absolute",
                        bar,
                        reps=totals[suffix],
                    )
                )
        achieved = [r.achieved for r in lat]
        results.add(
            Figure(
                f"peers.{name}.latency.achieved_vs_target",
                median(achieved),
                "x target rate",
                "info",
                reps=achieved,
            )
        )
    ours = {
        f.name.removeprefix(f"peers.{OURS}."): f.value
        for f in results.figures
        if f.name.startswith(f"peers.{OURS}.")
    }
    for name in drains:
        if name == OURS or not (drains[name] or latencies[name]):
            continue
        theirs = results.get(f"peers.{name}.drain.events_per_s")
        if theirs is not None:
            results.add(
                Figure(
                    f"peers.{OURS}.vs.{name}.drain",
                    ratio(ours.get("drain.events_per_s", float("nan")), theirs.value),
                    f"x {name}'s drain rate",
                    bar=Bar(">=", 1.0),
                )
            )
        for key in ("p50", "p99"):
            theirs = results.get(f"peers.{name}.latency.{key}_ms")
            if theirs is not None:
                paired = paired_ratios(latencies.get(OURS, []), latencies[name], key)
                results.add(
                    Figure(
                        f"peers.{OURS}.vs.{name}.{key}",
                        ratio(ours.get(f"latency.{key}_ms", float("nan")), theirs.value),
                        f"x {name}'s {key} at {plan.peers_rate}/s",
                        bar=Bar("<", 1.0),
                    )
                )
                results.add(
                    Figure(
                        f"peers.{OURS}.vs.{name}.{key}_paired",
                        median(paired),
                        f"x {name}'s {key}, per repetition",
                        "info",
                        reps=paired,
                    )
                )
                results.add(
                    Figure(
                        f"peers.{OURS}.vs.{name}.{key}_lower_in",
                        float(sum(value < 1.0 for value in paired)),
                        f"of {len(paired)} repetitions, each relay run in turn within one",
                        "info",
                    )
                )
        theirs = results.get(f"peers.{name}.latency.pickup_p99_ms")
        if theirs is not None:  # the part of the p99 a relay decides (see Run.pickup), not a bar
            results.add(
                Figure(
                    f"peers.{OURS}.vs.{name}.pickup_p99",
                    ratio(ours.get("latency.pickup_p99_ms", float("nan")), theirs.value),
                    f"x {name}'s pickup p99 at {plan.peers_rate}/s",
                    "info",
                )
            )
