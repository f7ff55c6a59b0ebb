"""Scenario 7, start-up: how long one relay process takes from exec to ready.

Ready is `/readyz` answering 200: the database answers, the schema is at head, coordination rounds
succeed and every sink is connected. A rolling restart waits this long for each new instance. The
baseline, started alternately with the relay in the same run, is the least any process needs before
it could do the same work: the same Python starts, imports asyncpg, aiokafka and redis.asyncio, and
opens one connection to each server (a query, a producer's metadata, a PING)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.request

from bench.plan import Plan
from bench.report import Figure, Results
from bench.stack import Servers, bench_relay_env, fresh_schema
from bench.stats import median, ratio
from devtools.embedded import free_port
from devtools.fleet import Fleet

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
RAW_CLIENT = """
import asyncio, sys
import aiokafka, asyncpg, redis.asyncio

async def main(database_url, kafka, redis_url):
    conn = await asyncpg.connect(database_url)
    await conn.fetchval("SELECT 1")
    await conn.close()
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    await producer.stop()
    client = redis.asyncio.from_url(redis_url)
    await client.ping()
    await client.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:  # not listening yet, or an HTTP error status (urllib's errors are OSErrors)
        return False


async def relay_ready_seconds(fleet: Fleet, name: str) -> float:
    """Seconds from starting `outbox-relay run` to its first 200 on /readyz; stops it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/readyz"
    started = time.monotonic()
    relay = fleet.spawn(name, OUTBOX_METRICS_ADDR=f"127.0.0.1:{port}")
    try:
        while not await asyncio.to_thread(_answers_ready, url):
            if not relay.alive():
                raise RuntimeError(f"relay {name} exited before it was ready:\n{relay.log()[-2000:]}")
            if time.monotonic() - started > READY_TIMEOUT:
                raise RuntimeError(f"relay {name} not ready after {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.01)
        return time.monotonic() - started
    finally:
        await asyncio.to_thread(relay.stop)
        fleet.relays.remove(relay)


async def raw_client_seconds(servers: Servers) -> float:
    """Seconds for a fresh Python process to import the three clients and connect once to each."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RAW_CLIENT,
        servers.db,
        servers.kafka,
        servers.redis,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the raw client failed: {stderr.decode(errors='replace')[-2000:]}")
    return time.monotonic() - started


async def startup_once(servers: Servers, plan: Plan, rep: int) -> dict[str, float]:
    """Median of `plan.startup_starts` starts of each, the relay and the raw client taking turns."""
    ready: list[float] = []
    raw: list[float] = []
    async with fresh_schema(servers.db) as schema:
        fleet = Fleet(servers.db, schema, servers.logs, bench_relay_env(servers, schema))
        for start in range(plan.startup_starts):
            raw.append(await raw_client_seconds(servers))
            ready.append(await relay_ready_seconds(fleet, f"bench-startup-{rep}-{start}"))
    return {"ready": median(ready), "raw": median(raw)}


async def run_startup(servers: Servers, plan: Plan, results: Results) -> None:
    if not (servers.kafka and servers.redis):
        results.note("startup", "skipped: needs Kafka and Redis")
        return
    runs = []
    for rep in range(plan.reps):
        run = await startup_once(servers, plan, rep)
        log.info("startup rep %d/%d: %s", rep + 1, plan.reps, {k: round(v, 3) for k, v in run.items()})
        runs.append(run)
    ready, raw = [r["ready"] for r in runs], [r["raw"] for r in runs]
    vs_raw = [ratio(r["ready"], r["raw"]) for r in runs]
    results.add(Figure("startup.ready_s", median(ready), "s", "absolute", reps=ready))
    results.add(Figure("startup.raw_client_s", median(raw), "s", "ceiling", reps=raw))
    results.add(Figure("startup.vs_raw", median(vs_raw), "x the raw client", reps=vs_raw))
    results.note(
        "startup",
        "`outbox-relay run` (defaults, Kafka and Redis configured, an existing schema at head) from exec"
        " to its first 200 on /readyz (database, schema, coordination and both sinks), polled every"
        " 10 ms, then stopped with SIGTERM; raw_client: a fresh interpreter that imports asyncpg, aiokafka and redis.asyncio and connects once to each server. Each"
        f" repetition is the median of {plan.startup_starts} starts of each, taking turns.",
    )
