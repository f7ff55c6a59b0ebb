"""End to end, effectively once (issue 14): writers commit events while 2 relays and 3
`outbox-relay consume` processes run, for Kafka and for Redis Streams (sharded), and a relay and a
consumer are killed with SIGKILL in the middle. Every event's business effect (a row the handler
inserts in the inbox's transaction) exists exactly once, and per key in the order written; the
surviving consumers stop cleanly (exit 0) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from devtools.embedded import StackEndpoints
from devtools.fleet import RELAY_BIN, Fleet, RelayProcess, create_kafka_topic, wait_until, write_events
from tests.consumer_handlers import effects_table_sql

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHARDS = 4
EVENTS = 1500


@dataclass
class ConsumerProcess(RelayProcess):
    """An `outbox-relay consume` process (RelayProcess's kill/stop/log helpers, another command)."""

    args: tuple[str, ...] = ()

    def start(self) -> ConsumerProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env = {**base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **self.env, "POD_NAME": self.instance_id}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [RELAY_BIN, "consume", *self.args], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=ROOT,
            )
        return self


async def effects_count(pg: asyncpg.Connection, table: str) -> int:
    return int(await pg.fetchval(f"SELECT count(DISTINCT message_id) FROM {table}"))


@pytest.mark.parametrize("sink", ["kafka", "redis"])
async def test_every_event_takes_effect_exactly_once_in_key_order_through_kill_9(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], schema: str, pg: asyncpg.Connection,
    tmp_path: Path, sink: str,
) -> None:
    topic = topics[sink]
    table = f"{schema}.effects"
    await pg.execute(effects_table_sql(table))
    if sink == "kafka":
        await create_kafka_topic(stack.kafka_bootstrap, topic, partitions=6)
        source = ("--kafka", topic.rsplit(".", 1)[0] + ".*")  # a pattern subscription
    else:
        source = ("--redis", topic, "--shards", str(SHARDS))
    relays = fleet.spawn_many(2, OUTBOX_REDIS_SHARDS=f"{topic}={SHARDS}")
    consumer_env = {
        **fleet.base_env,
        "CONSUMER_TEST_TABLE": table,
        "OUTBOX_INBOX_LOCK_STALE_THRESHOLD": "3",
        "OUTBOX_KAFKA_SESSION_TIMEOUT": "6",
        "OUTBOX_KAFKA_METADATA_MAX_AGE": "2",
        "OUTBOX_REDIS_LEASE_TTL": "3",
        "OUTBOX_REDIS_CLAIM_IDLE": "5",
        "OUTBOX_CONSUMER_BACKOFF_MAX": "1",
    }
    consumers = [
        ConsumerProcess(f"consumer-{sink}-{n}", consumer_env, tmp_path / f"consumer-{n}.log",
                        args=("--group", "billing", *source, "tests.consumer_handlers:record")).start()
        for n in range(3)
    ]

    def logs() -> str:
        return "\n".join(f"--- {p.instance_id}\n{p.log()[-3000:]}" for p in [*relays, *consumers])

    try:
        writing = asyncio.create_task(
            write_events(stack.database_url, schema, [topic], total=EVENTS, keys=60, writers=3, per_txn=5,
                         pace=0.04)
        )

        async def flowing() -> bool:
            return await effects_count(pg, table) >= EVENTS // 5

        try:
            await wait_until(flowing, 90, what="effects to flow")
        except AssertionError:
            raise AssertionError(f"{await effects_count(pg, table)} effects after 90 s\n{logs()}") from None
        working = dict(await pg.fetch(f"SELECT consumer, count(*) FROM {table} GROUP BY consumer"))
        victim = next(c for c in consumers if working.get(c.instance_id))  # one that has work to lose
        relays[0].signal(signal.SIGKILL)
        victim.signal(signal.SIGKILL)
        written = await writing

        async def all_done() -> bool:
            return await effects_count(pg, table) >= len(written)

        try:
            await wait_until(all_done, 120, interval=0.5, what="every event's effect")
        except AssertionError:
            raise AssertionError(f"{await effects_count(pg, table)}/{len(written)} effects\n{logs()}") from None
        await asyncio.sleep(1.0)  # a late duplicate effect would show now
        rows = await pg.fetch(f"SELECT message_id, key FROM {table} ORDER BY seq")
        assert len(rows) == len(written), "an event took effect twice"
        assert {r["message_id"] for r in rows} == {w.message_id for w in written}
        order = {w.message_id: w.id for w in written}
        by_key: dict[str, list[int]] = defaultdict(list)
        for row in rows:
            by_key[row["key"]].append(order[row["message_id"]])
        broken = {key: ids for key, ids in by_key.items() if ids != sorted(ids)}
        assert not broken, f"per-key order broken for {len(broken)} keys, e.g. {next(iter(broken.items()))}"
        by_consumer = dict(await pg.fetch(f"SELECT consumer, count(*) FROM {table} GROUP BY consumer"))
        assert len(by_consumer) >= 2, f"the survivors took the victim's work over: {by_consumer}"
        duplicates = await pg.fetchval(f'SELECT count(*) FROM "{schema}".inbox WHERE status <> \'processed\'')
        assert duplicates == 0
        survivors = [c for c in consumers if c is not victim]
        for survivor in survivors:
            survivor.terminate()
        for survivor in survivors:
            assert await asyncio.to_thread(survivor.wait, 60) == 0, logs()
    finally:
        for process in consumers:
            process.stop(10)
