"""The control plane cannot hurt publishing: a storm of read RPCs against the control plane served
inside one of two relays, on a backlog of a million events, while the relays publish it. No lease may
change hands, and the backlog must keep shrinking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from devtools.embedded import StackEndpoints, free_port
from devtools.fleet import Fleet, relay_logs, wait_until

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

BACKLOG = int(os.environ.get("OUTBOX_TEST_ISOLATION_BACKLOG", "1000000"))
CONCURRENCY = 200
STORM_SECONDS = 20.0
CALL_TIMEOUT = 5.0
PARTITIONS = 16



async def insert_backlog(conn: asyncpg.Connection, schema: str, streams: list[str], rows: int) -> None:
    """One statement: tiny payloads, keys spread over every partition."""
    await conn.execute(
        f"""
        INSERT INTO "{schema}".outbox (topic, key, payload)
        SELECT ($1::text[])[1 + i % cardinality($1::text[])], 'k' || (i % 5000), '\\x78'::bytea
        FROM generate_series(1, $2::int) AS i
        """,
        streams,
        rows,
    )
    await conn.execute(f'ANALYZE "{schema}".outbox')


async def lease_table(conn: asyncpg.Connection, schema: str) -> dict[str, tuple[str | None, int, bool]]:
    rows = await conn.fetch(
        f'SELECT name, holder, token, expires_at > now() AS live FROM "{schema}".distributed_locks'
    )
    return {r["name"]: (r["holder"], r["token"], r["live"]) for r in rows}


def settled(table: dict[str, tuple[str | None, int, bool]]) -> bool:
    """Every partition and the leader held, and both relays doing their share."""
    held = {name: holder for name, (holder, _, live) in table.items() if live and holder}
    if len(held) != PARTITIONS + 1:
        return False
    per_relay = Counter(holder for name, holder in held.items() if name != "leader")
    return sorted(per_relay.values()) == [PARTITIONS // 2, PARTITIONS // 2]


@dataclass
class Storm:
    codes: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)
    slowest: float = 0.0

    def record(self, method: str, code: grpc.StatusCode, took: float) -> None:
        self.codes[code.name] += 1
        self.by_method[f"{method}:{code.name}"] += 1
        self.latencies.append(took)
        if code is grpc.StatusCode.OK:
            self.ok_latencies.append(took)
        self.slowest = max(self.slowest, took)

    def ok_median(self) -> float:
        ordered = sorted(self.ok_latencies)
        return ordered[len(ordered) // 2] if ordered else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def storm(addr: str, seconds: float, concurrency: int) -> Storm:
    """`concurrency` callers, each calling GetStatus / ListStuck / ListLocks back to back."""
    result = Storm()
    channels = [grpc.aio.insecure_channel(addr) for _ in range(4)]
    stubs = [pb_grpc.ControlServiceStub(c) for c in channels]
    end = time.monotonic() + seconds

    async def caller(n: int) -> None:
        stub = stubs[n % len(stubs)]
        calls = [
            ("GetStatus", lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)),
            ("ListStuck", lambda: stub.ListStuck(pb.ListStuckRequest(page_size=1000), timeout=CALL_TIMEOUT)),
            ("GetStatus", lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)),
            ("ListLocks", lambda: stub.ListLocks(pb.ListLocksRequest(), timeout=CALL_TIMEOUT)),
        ]
        i = n
        while time.monotonic() < end:
            started = time.monotonic()
            method, call = calls[i % len(calls)]
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.05)  # a polite client backs off a little
            else:
                code = grpc.StatusCode.OK
            result.record(method, code, time.monotonic() - started)
            i += 1

    try:
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    return result


async def test_a_read_storm_on_a_million_row_backlog_does_not_cost_a_lease(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    streams = [f"{topics['redis']}.{n}" for n in range(4)]
    conn = await asyncpg.connect(fleet.database_url)
    try:
        started = time.monotonic()
        await insert_backlog(conn, fleet.schema, streams, BACKLOG)
        log.warning("inserted %d rows in %.1fs", BACKLOG, time.monotonic() - started)

        addr = f"127.0.0.1:{free_port()}"
        env = {"OUTBOX_BATCH_SIZE": "500"}
        fleet.spawn("relay-a", OUTBOX_CONTROL_ADDR=addr, **env)
        fleet.spawn("relay-b", **env)

        stable_since = [time.monotonic()]
        last: list[dict[str, tuple[str | None, int, bool]]] = [{}]

        async def stable() -> bool:
            table = await lease_table(conn, fleet.schema)
            if table != last[0] or not settled(table):
                last[0], stable_since[0] = table, time.monotonic()
                return False
            return time.monotonic() - stable_since[0] >= 3.0

        await wait_until(stable, 40, interval=0.25, what="both relays to hold their share of the leases")
        before = last[0]
        pending_before = int(await conn.fetchval(f'SELECT count(*) FROM "{fleet.schema}".outbox'))
        log.warning("leases settled; %d events pending", pending_before)

        changes: list[str] = []

        done = asyncio.Event()

        async def watch() -> None:
            # Stops between two queries: cancelling one mid-query would leave `conn` busy.
            while not done.is_set():
                table = await lease_table(conn, fleet.schema)
                for name, (holder, token, live) in table.items():
                    was = before.get(name)
                    if was is None or (holder, token) != was[:2] or not live:
                        changes.append(f"{name}: {was} -> {(holder, token, live)}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.25)

        watcher = asyncio.create_task(watch())
        try:
            storm_started = time.monotonic()
            result = await storm(addr, STORM_SECONDS, CONCURRENCY)
            storm_took = time.monotonic() - storm_started
        finally:
            done.set()
            await watcher
        pending_after = int(await conn.fetchval(f'SELECT count(*) FROM "{fleet.schema}".outbox'))
        after = await lease_table(conn, fleet.schema)
    finally:
        await conn.close()

    summary = (
        f"{sum(result.codes.values())} calls in {storm_took:.1f}s: {dict(result.by_method)}; "
        f"p50 {result.percentile(0.5):.3f}s, p99 {result.percentile(0.99):.3f}s, slowest {result.slowest:.2f}s, "
        f"p50 of answered calls {result.ok_median():.3f}s; "
        f"pending {pending_before} -> {pending_after}; lease changes: {len(changes)}"
    )
    log.warning("storm: %s", summary)
    assert not changes, f"leases changed hands or lapsed during the storm ({summary}): {changes[:10]}\n" + (
        relay_logs(fleet)
    )
    assert {n: v[:2] for n, v in after.items()} == {n: v[:2] for n, v in before.items()}
    assert pending_before - pending_after >= 10_000, f"publishing stalled during the storm: {summary}"
    assert result.codes["OK"] > 0, f"the control plane answered nothing: {summary}"
    unexpected = set(result.codes) - {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert not unexpected, f"unexpected statuses: {summary}"
    # Refused or answered, every call came back well within its deadline rather than queueing forever.
    assert storm_took < STORM_SECONDS + CALL_TIMEOUT + 2, summary
    for relay in fleet.relays:
        assert relay.alive(), relay_logs(fleet)
        assert "lease lost" not in relay.log(), relay_logs(fleet)
