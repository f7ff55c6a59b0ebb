"""Sink faults (issue 12): a sink that cannot take events *now* is an outage, never the events'
fault. Such an error counts no attempt and dead-letters nothing however long it lasts; the relay
backs off per sink (and per topic when the cause is one topic) while other topics in the same
partitions keep flowing; and a relay that alone lost its sink hands its partitions to healthy
peers and reports itself not ready.

Real relay processes against real servers; everything is checked from the outside: what reached
the brokers, what is left in the outbox (and its attempts), what was dead-lettered, who holds which
lease, and what /readyz says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.exceptions import ResponseError

from clients.writer import OutboxEvent, aenqueue_many
from devtools.embedded import EmbeddedStack, StackEndpoints
from devtools.fleet import (
    Fleet,
    Received,
    Written,
    check_delivery,
    create_kafka_topic,
    leases_by_holder,
    pending_count,
    read_kafka,
    read_redis,
    relay_env,
    relay_logs,
    running,
    unique_name,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.slow
PARTITIONS = 16
# Seconds a relay whose sink alone is down keeps its partitions before handing them over.
HANDOVER_AFTER = "OUTBOX_SINK_HANDOVER_AFTER"


# -- helpers -------------------------------------------------------------------------------------


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def dead_letters(fleet: Fleet) -> list[asyncpg.Record]:
    return await fetch(fleet.database_url, f'SELECT * FROM "{fleet.schema}".dead_letter_archive ORDER BY id')


def describe_dead_letters(rows: list[asyncpg.Record]) -> str:
    reasons = sorted({(r["reason"], (r["last_error"] or "")[:120]) for r in rows})
    return f"{len(rows)} events dead-lettered; (reason, last_error): {reasons[:3]}"


async def assert_nothing_dead_lettered(fleet: Fleet, when: str) -> None:
    rows = await dead_letters(fleet)
    assert not rows, f"{when}: {describe_dead_letters(rows)}"


async def partition_counts(fleet: Fleet) -> dict[str, int]:
    held = await leases_by_holder(fleet.database_url, fleet.schema)
    counts = {h: len([n for n in names if n.startswith("partition:")]) for h, names in held.items()}
    return {h: c for h, c in counts.items() if c}


async def all_partitions_held(fleet: Fleet, timeout: float = 30) -> None:
    async def held() -> bool:
        return sum((await partition_counts(fleet)).values()) == PARTITIONS

    await wait_until(held, timeout, what="every partition to be leased")


async def drained(fleet: Fleet, timeout: float = 60) -> float:
    async def empty() -> bool:
        return await pending_count(fleet.database_url, fleet.schema) == 0

    try:
        return await wait_until(empty, timeout, what="the outbox to drain")
    except AssertionError:
        left = await pending_count(fleet.database_url, fleet.schema)
        raise AssertionError(f"{left} events still pending after {timeout}s\n{relay_logs(fleet)}") from None


def alive(fleet: Fleet) -> None:
    dead = [
        (r.instance_id, r.process.returncode if r.process else None) for r in fleet.relays if not r.alive()
    ]
    assert not dead, f"relays exited: {dead}\n{relay_logs(fleet)}"


async def hold_outage(fleet: Fleet, seconds: float, what: str) -> None:
    """Keeps an outage going for `seconds` (its length is the point: longer than any retry
    schedule), checking all along that nothing is dead-lettered and no relay gave up."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        await assert_nothing_dead_lettered(fleet, f"during {what}")
        alive(fleet)
        await asyncio.sleep(0.5)


async def keys_covering_partitions(database_url: str, per_partition: int) -> list[str]:
    """`per_partition` keys in each of the outbox's partitions (its own formula), so every
    partition carries both the failing topic and the healthy ones."""
    rows = await fetch(
        database_url,
        """SELECT k FROM (
               SELECT k, row_number() OVER (PARTITION BY p ORDER BY g) AS n
               FROM (SELECT 'k' || g AS k, g,
                            (hashtext('k' || g)::bigint & 2147483647) % $1 AS p
                     FROM generate_series(0, 2000) g) s) t
           WHERE n <= $2 ORDER BY k""",
        PARTITIONS,
        per_partition,
    )
    keys = [r["k"] for r in rows]
    assert len(keys) == PARTITIONS * per_partition
    return keys


async def attempts_by_count(fleet: Fleet, topic: str) -> dict[int, int]:
    """Pending events of `topic`: attempts -> how many."""
    rows = await fetch(
        fleet.database_url,
        f'SELECT attempts, count(*) AS n FROM "{fleet.schema}".outbox WHERE topic = $1 GROUP BY attempts',
        topic,
    )
    return {r["attempts"]: r["n"] for r in rows}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HttpResponse:
    status: int
    body: str


async def http_get(port: int, path: str) -> HttpResponse | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    return HttpResponse(int(head.split(" ", 2)[1]), body)


# -- Redis refusing writes -----------------------------------------------------------------------


@dataclass
class RedisOutOfMemory:
    client: aioredis.Redis
    probe: str

    async def xadd_error(self) -> str | None:
        """The error a plain XADD gets now, or None when Redis accepts writes."""
        try:
            await self.client.xadd(self.probe, {"probe": "1"})
        except ResponseError as exc:
            return f"{type(exc).__name__}: {exc}"
        await self.client.delete(self.probe)
        return None


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.asynccontextmanager
async def redis_out_of_memory(redis_url: str) -> AsyncIterator[RedisOutOfMemory]:
    """Redis at `maxmemory` with `noeviction`: the limit sits just above what it used before the
    test, and junk the test writes holds it over, so every write (XADD, in a script or not) fails
    with OOM while reads still work. Restored (limit, policy, junk) on the way out."""
    client = aioredis.from_url(redis_url)
    junk = unique_name("junk.")
    outage = RedisOutOfMemory(client, unique_name("probe."))
    saved: dict[str, str] = {}
    try:
        try:
            for name in ("maxmemory", "maxmemory-policy"):
                for key, value in (await client.config_get(name)).items():
                    saved[text(key)] = text(value)
        except ResponseError as exc:
            pytest.skip(f"this Redis refuses CONFIG ({exc}); the test needs to set maxmemory")
        await client.config_set("maxmemory-policy", "noeviction")
        before = int((await client.info("memory"))["used_memory"])
        chunk = b"j" * 16_384
        for n in range(128):  # 2 MiB
            await client.set(f"{junk}:{n}", chunk)
        with_junk = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", before + (with_junk - before) // 2)
        error = await outage.xadd_error()
        assert error is not None and "maxmemory" in error, f"Redis still accepts XADD: {error}"
        yield outage
    finally:
        with contextlib.suppress(Exception):
            for name, value in saved.items():
                await client.config_set(name, value)
            keys = [key async for key in client.scan_iter(f"{junk}:*")]
            if keys:
                await client.delete(*keys)
            await client.delete(outage.probe)
        await client.aclose()


@pytest.mark.parametrize("scripts", ["true", "false"], ids=["scripted", "pipelined"])
async def test_redis_refusing_writes_dead_letters_nothing(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], scripts: str
) -> None:
    """OOM is the server's state, not the events' fault: an outage far longer than the whole
    retry schedule (3 attempts, 0.1-0.5 s apart) must dead-letter nothing."""
    stream = topics["redis"]
    for n in range(2):
        fleet.spawn(
            f"relay-{n}",
            OUTBOX_REDIS_SCRIPTS=scripts,
            OUTBOX_MAX_ATTEMPTS="3",
            OUTBOX_BACKOFF_INITIAL="0.1",
            OUTBOX_BACKOFF_MAX="0.5",
            OUTBOX_SINK_BACKOFF_MAX="1",
        )
    await all_partitions_held(fleet)
    warm = await write_events(fleet.database_url, fleet.schema, [stream], total=40, keys=20)
    await drained(fleet, timeout=30)  # both relays publish to this Redis before the outage

    async with redis_out_of_memory(stack.redis_url) as outage:
        written = await write_events(fleet.database_url, fleet.schema, [stream], total=200, keys=20)
        await hold_outage(fleet, 10, "a 10 s Redis OOM")
        assert await pending_count(fleet.database_url, fleet.schema) == 200, "was the outage real?"
        attempts = await attempts_by_count(fleet, stream)
        assert attempts == {0: 200}, f"an outage counts no attempt; pending events by attempts: {attempts}"
        still = await outage.xadd_error()
        assert still is not None and "maxmemory" in still, f"Redis accepted writes during the outage: {still}"

    await drained(fleet, timeout=45)
    result = check_delivery(warm + written, await read_redis(stack.redis_url, stream))
    assert result["delivered"] == 240, result
    await assert_nothing_dead_lettered(fleet, "after the outage")
    alive(fleet)


# -- a new Kafka topic while the broker is down --------------------------------------------------


async def test_a_new_kafka_topic_during_a_broker_outage_is_not_dead_lettered(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    """An unreachable broker cannot say a topic is unknown: its first events, written while the
    broker is frozen for well past OUTBOX_UNKNOWN_TOPIC_GRACE, wait for it and are delivered."""
    stack = EmbeddedStack(postgres=False, redis=False)  # its own broker, since it is frozen
    endpoints = await asyncio.to_thread(stack.start)
    frozen: int | None = None
    try:
        warm_topic, new_topic = unique_name("kt.warm."), unique_name("kt.new.")
        await create_kafka_topic(endpoints.kafka_bootstrap, warm_topic)
        env = relay_env(
            database_url,
            schema,
            endpoints.kafka_bootstrap,
            OUTBOX_UNKNOWN_TOPIC_GRACE="3",
            # Short requests, so a metadata request to the frozen broker gives up within the
            # outage (aiokafka's request timeout is this, at most 30 s).
            OUTBOX_PUBLISH_TIMEOUT="3",
            OUTBOX_SINK_BACKOFF_MAX="1",
        )
        fleet = Fleet(database_url, schema, tmp_path, env)
        with running(fleet):
            for n in range(2):
                fleet.spawn(f"relay-{n}")
            await all_partitions_held(fleet)
            warm = await write_events(database_url, schema, [warm_topic], total=50, keys=20)
            await drained(fleet, timeout=30)  # connected, with metadata for the warm topic only
            # The topic exists once the broker is back; the relays have never asked about it.
            await create_kafka_topic(endpoints.kafka_bootstrap, new_topic)

            frozen = stack.pids()["kafka"]
            os.kill(frozen, signal.SIGSTOP)
            written = await write_events(database_url, schema, [new_topic], total=300, keys=30)
            await hold_outage(fleet, 15, "a 15 s broker freeze (grace 3 s)")
            assert await pending_count(database_url, schema) == 300, "was the broker really frozen?"
            os.kill(frozen, signal.SIGCONT)
            frozen = None

            await drained(fleet, timeout=45)
            received = await read_kafka(
                endpoints.kafka_bootstrap, new_topic, expect=[w.message_id for w in written]
            )
            result = check_delivery(written, received)
            assert result["delivered"] == 300, result
            check_delivery(warm, await read_kafka(endpoints.kafka_bootstrap, warm_topic))
            await assert_nothing_dead_lettered(fleet, "after the broker came back")
            alive(fleet)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        await asyncio.to_thread(stack.stop)


# -- one unavailable topic, many healthy ones ----------------------------------------------------


@dataclass
class LatencyProbe:
    """Commit time (after COMMIT returned) and first receive time of each event, one clock."""

    committed: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)

    def latencies(self, message_ids: list[str]) -> list[float]:
        return sorted(self.received[m] - self.committed[m] for m in message_ids if m in self.received)


async def consume_into(probe: LatencyProbe, bootstrap: str, topics: list[str], stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        tps = []
        for topic in topics:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=50, max_records=10_000)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    message_id = dict(record.headers)["message-id"].decode()
                    probe.received.setdefault(message_id, now)
    finally:
        await consumer.stop()


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def write_paced(
    database_url: str,
    schema: str,
    probe: LatencyProbe,
    make_txn: Callable[[int], list[OutboxEvent]],
    seconds: float,
    every: float,
) -> list[Written]:
    """One transaction every `every` seconds for `seconds`; records each event's commit time."""
    written: list[Written] = []
    conn = await asyncpg.connect(database_url)
    try:
        started, n = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            events = make_txn(n)
            async with conn.transaction():
                results = await aenqueue_many(conn, events, schema=schema)
            now = time.monotonic()
            for r, e in zip(results, events, strict=True):
                probe.committed[str(r.message_id)] = now
                written.append(Written(r.id or 0, str(r.message_id), e.topic, e.key or ""))
            n += 1
            await asyncio.sleep(max(0.0, started + n * every - time.monotonic()))
    finally:
        await conn.close()
    return written


@contextlib.asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    yield


@pytest.mark.parametrize("cause", ["redis_refusing_connections", "redis_out_of_memory"])
async def test_one_unavailable_topic_does_not_slow_the_others(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], cause: str
) -> None:
    """A topic whose sink cannot take events (here: the only Redis-routed topic, its Redis
    refusing connections or out of memory; Tansu creates unknown Kafka topics, so an unknown topic
    cannot stand in) shares every partition and every key with three healthy Kafka topics. The
    healthy events' commit-to-consumer latency stays low; the failing topic's events wait with no
    attempt counted and nothing dead-lettered."""
    bad = topics["redis"]
    healthy = [unique_name(f"kt.ok{n}.") for n in range(3)]
    for topic in healthy:
        await create_kafka_topic(stack.kafka_bootstrap, topic)
    env: dict[str, str] = {}
    if cause == "redis_refusing_connections":
        env["OUTBOX_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for n in range(2):
        fleet.spawn(f"relay-{n}", **env)
    await all_partitions_held(fleet)
    keys = await keys_covering_partitions(fleet.database_url, 2)

    probe, stop = LatencyProbe(), asyncio.Event()
    consuming = asyncio.create_task(consume_into(probe, stack.kafka_bootstrap, healthy, stop))
    outage = redis_out_of_memory(stack.redis_url) if cause == "redis_out_of_memory" else nothing()
    try:
        # Warm up: every relay has published to every healthy topic before the measurement.
        warm = await write_events(fleet.database_url, fleet.schema, healthy, total=64, keys=64)

        async def warm_arrived() -> bool:
            return all(w.message_id in probe.received for w in warm)

        await wait_until(warm_arrived, 30, what="the warm-up events to reach the consumer")

        def txn(n: int) -> list[OutboxEvent]:
            chosen = [keys[(4 * n + i) % len(keys)] for i in range(4)]
            events = [
                OutboxEvent(topic=healthy[i % 3], key=k, payload={"n": n}) for i, k in enumerate(chosen)
            ]
            events.append(OutboxEvent(topic=bad, key=keys[(7 * n) % len(keys)], payload={"n": n}))
            return events

        async with outage:
            # 20 transactions a second for 12 s: 80 healthy events/s, 20/s for the failing topic.
            written = await write_paced(fleet.database_url, fleet.schema, probe, txn, seconds=12, every=0.05)
            good = [w for w in written if w.topic != bad]
            failing = [w for w in written if w.topic == bad]

            async def healthy_arrived() -> bool:
                return all(w.message_id in probe.received for w in good)

            try:
                await wait_until(healthy_arrived, 30, what="every healthy event to reach the consumer")
            except AssertionError:
                late = probe.latencies([w.message_id for w in good])
                missing = sum(w.message_id not in probe.received for w in good)
                raise AssertionError(
                    f"{missing} of {len(good)} healthy events not delivered 30 s after writing ended; "
                    f"of those delivered, p99 latency {percentile(late, 0.99) if late else float('nan'):.2f}s, "
                    f"max {max(late, default=float('nan')):.2f}s"
                ) from None
            latencies = probe.latencies([w.message_id for w in good])
            p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
            print(
                f"healthy commit-to-consumer latency ({cause}): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
            )
            assert p99 < 1.0, (
                f"healthy topics slowed by the unavailable one: p50 {p50:.3f}s p99 {p99:.3f}s "
                f"max {latencies[-1]:.3f}s over {len(latencies)} events"
            )

            attempts = await attempts_by_count(fleet, bad)
            await assert_nothing_dead_lettered(fleet, "while its sink was unavailable")
            assert attempts == {0: len(failing)}, (
                f"the unavailable topic's {len(failing)} events must wait with attempts = 0; "
                f"pending by attempts: {attempts}"
            )
    finally:
        stop.set()
        await consuming

    received: list[Received] = []
    for topic in healthy:
        received += await read_kafka(stack.kafka_bootstrap, topic)
    assert check_delivery(warm + good, received)["delivered"] == len(warm) + len(good)
    alive(fleet)


# -- a relay that alone lost its sink ------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder run by the test: one relay reaches Redis through it, so cutting it takes
    that relay's sink away and no one else's."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.forwarded = 0
        self.refusing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        """Stop accepting (connecting is refused) and break every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.cut_connections()

    async def refuse(self) -> None:
        """Break every open connection and reset each new one, while keeping the port. For an outage
        that ends on the same port: a stopped listener's port can be taken meanwhile, by a client's
        retry connecting to itself (TCP self-connect through the ephemeral port range) among others."""
        self.refusing = True
        await self.cut_connections()

    def accept(self) -> None:
        self.refusing = False

    async def cut_connections(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            for w in (writer, up_writer):
                self._transports.discard(w.transport)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                self.forwarded += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


async def test_a_relay_that_alone_lost_its_broker_hands_over_its_partitions(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    """Relay A reaches Redis through a proxy, relay B directly. Cutting the proxy leaves B healthy:
    within a bounded time A holds no partition and B holds all, A's /readyz says its sink is not
    ready, and every event, written before and after the cut, arrives in per-key order."""
    stream = topics["redis"]
    target = urlsplit(stack.redis_url)
    assert target.hostname and target.port
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    handover_after, ttl = 3.0, 3.0  # relay_env sets OUTBOX_LEASE_TTL=3
    common = {
        "OUTBOX_DEFAULT_SINK": "redis",
        HANDOVER_AFTER: str(handover_after),
        "OUTBOX_SINK_BACKOFF_MAX": "1",
    }
    ops_port = free_port()
    cut = fleet.spawn(
        "relay-cut",
        OUTBOX_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
        OUTBOX_METRICS_ADDR=f"127.0.0.1:{ops_port}",
        **common,
    )
    healthy = fleet.spawn("relay-direct", **common)
    try:

        async def split() -> bool:
            counts = await partition_counts(fleet)
            return sum(counts.values()) == PARTITIONS and all(
                counts.get(r.instance_id, 0) > 0 for r in (cut, healthy)
            )

        await wait_until(split, 30, what="both relays to hold partitions")
        before = await write_events(fleet.database_url, fleet.schema, [stream], total=600, keys=100)
        await drained(fleet, timeout=30)  # both relays delivered, A through the proxy
        assert proxy.forwarded > 0

        await proxy.refuse()
        cut_at = time.monotonic()
        writing = asyncio.create_task(
            write_events(fleet.database_url, fleet.schema, [stream], total=1_000, keys=100, pace=0.2)
        )

        last: list[HttpResponse | None] = [None]

        async def not_ready() -> bool:
            last[0] = await http_get(ops_port, "/readyz")
            return last[0] is not None and last[0].status == 503

        await wait_until(not_ready, 20, what="the cut relay's /readyz to answer 503")
        assert last[0] is not None
        checks = json.loads(last[0].body)
        assert checks.get("sink_redis") is False and checks.get("database") is True, checks

        async def handed_over() -> bool:
            return await partition_counts(fleet) == {healthy.instance_id: PARTITIONS}

        bound = handover_after + 2 * ttl + 15
        try:
            took = await wait_until(handed_over, bound, interval=0.2, what="the handover")
        except AssertionError:
            raise AssertionError(
                f"{time.monotonic() - cut_at:.0f}s after its Redis was cut, the cut relay still holds "
                f"partitions: {await partition_counts(fleet)} (expected all {PARTITIONS} on "
                f"{healthy.instance_id} within {bound:.0f}s)"
            ) from None
        print(f"handover {time.monotonic() - cut_at:.1f}s after the cut (waited {took:.1f}s)")

        written = await writing
        await drained(fleet, timeout=45)
        result = check_delivery(before + written, await read_redis(stack.redis_url, stream))
        assert result["delivered"] == 1_600, result
        await assert_nothing_dead_lettered(fleet, "after the handover")
        assert await partition_counts(fleet) == {healthy.instance_id: PARTITIONS}, "the cut relay came back"
        alive(fleet)
    finally:
        proxy.accept()  # restored: the cut relay may take partitions again
        await asyncio.to_thread(fleet.stop_all)  # the loop keeps serving the proxy meanwhile
        await proxy.cut()
