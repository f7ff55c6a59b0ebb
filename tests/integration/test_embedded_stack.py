"""The embedded stack starts real servers, they serve real clients, and none outlives its parent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import psycopg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devtools.embedded import EmbeddedStack, StackEndpoints, endpoints_from_env, external_or_embedded

REPO_ROOT = Path(__file__).resolve().parents[2]
GONE_TIMEOUT = 10.0

CHILD_SCRIPT = """
import json, sys, time
from devtools.embedded import EmbeddedStack
stack = EmbeddedStack()
stack.start()
print(json.dumps({"pids": stack.pids(), "state_dir": str(stack.state_dir)}), flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _wait_all_gone(pids: dict[str, int]) -> dict[str, int]:
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:
        alive = {name: pid for name, pid in pids.items() if not _gone(pid)}
        if not alive:
            return alive
        time.sleep(0.1)
    return {name: pid for name, pid in pids.items() if not _gone(pid)}


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.fixture
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack() as started:
        yield started


async def _postgres_round_trip(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select 1") == 1
        await conn.execute("create table t (id bigint primary key, body jsonb not null)")
        await conn.execute("insert into t values ($1, $2)", 7, json.dumps({"k": "v"}))
        assert json.loads(await conn.fetchval("select body from t where id = 7")) == {"k": "v"}
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url) as pconn:
        cursor = await pconn.execute("select count(*) from t")
        assert await cursor.fetchone() == (1,)


async def _kafka_round_trip(bootstrap: str, topic: str, payload: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload, key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), timeout=15)
    finally:
        await consumer.stop()
    assert (message.key, message.value) == (b"k", payload)


async def _redis_round_trip(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entry_id = await client.xadd("outbox", {"payload": "hello"})
        entries = await client.xrange("outbox")
        assert entries == [(entry_id, {b"payload": b"hello"})]
    finally:
        await client.aclose()


def test_stack_serves_real_clients_and_leaves_no_process(stack: EmbeddedStack) -> None:
    endpoints = stack.endpoints
    pids = stack.pids()
    assert set(pids) == {"postgres", "kafka", "redis"}
    assert stack.start() == endpoints  # idempotent

    async def exercise() -> None:
        await asyncio.gather(
            _postgres_round_trip(endpoints.database_url),
            _kafka_round_trip(endpoints.kafka_bootstrap, f"t-{uuid.uuid4().hex}", b"payload"),
            _redis_round_trip(endpoints.redis_url),
        )

    asyncio.run(exercise())
    state_dir = stack.state_dir
    assert state_dir is not None

    stack.stop()
    stack.stop()  # idempotent

    assert stack.pids() == {}
    assert _wait_all_gone(pids) == {}
    assert not state_dir.exists()


def test_stop_and_start_single_servers_keep_their_ports() -> None:
    with EmbeddedStack(redis_persistent=True) as stack:
        before = stack.endpoints
        old_pids = stack.pids()

        asyncio.run(_redis_round_trip(before.redis_url))
        stack.stop_redis()
        stack.stop_kafka()
        assert set(stack.pids()) == {"postgres"}
        assert _wait_all_gone({k: old_pids[k] for k in ("redis", "kafka")}) == {}

        stack.start_redis()
        stack.start_kafka()
        assert stack.endpoints == before
        assert stack.pids()["redis"] != old_pids["redis"]

        async def check() -> None:
            client = aioredis.Redis.from_url(before.redis_url)
            try:
                entries = await client.xrange("outbox")
                assert entries is not None
                assert [fields for _, fields in entries] == [{b"payload": b"hello"}]
            finally:
                await client.aclose()
            await _kafka_round_trip(before.kafka_bootstrap, "after-restart", b"again")

        asyncio.run(check())


def test_postgres_restart_keeps_port_and_data() -> None:
    with EmbeddedStack(kafka=False, redis=False) as stack:
        url = stack.endpoints.database_url

        async def write() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("create table kept as select 42 as answer")
            finally:
                await conn.close()

        async def read() -> int:
            conn = await asyncpg.connect(url)
            try:
                answer: int = await conn.fetchval("select answer from kept")
                return answer
            finally:
                await conn.close()

        asyncio.run(write())
        old_pid = stack.pids()["postgres"]
        stack.stop_postgres()
        assert stack.pids() == {}
        assert _gone(old_pid)
        stack.start_postgres()
        assert stack.endpoints.database_url == url
        assert asyncio.run(read()) == 42


def test_servers_survive_the_thread_that_started_them() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; the stack must not tie servers to it.
    with EmbeddedStack(postgres=False, kafka=False) as stack:
        stack.stop_redis()
        starter = threading.Thread(target=stack.start_redis)
        starter.start()
        starter.join()
        pid = stack.pids()["redis"]
        time.sleep(0.5)
        assert not _gone(pid)
        asyncio.run(_redis_round_trip(stack.endpoints.redis_url))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_parent_death_leaves_no_server_process(sig: signal.Signals, tmp_path: Path) -> None:
    stderr_path = tmp_path / "child.stderr"
    with stderr_path.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"child printed nothing; stderr:\n{stderr_path.read_text()}"
        report = json.loads(line)
        pids: dict[str, int] = report["pids"]
        assert set(pids) == {"postgres", "kafka", "redis"}
        assert not any(_gone(pid) for pid in pids.values())

        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()

    assert _wait_all_gone(pids) == {}
    state_dir = Path(report["state_dir"])
    if sig == signal.SIGINT:
        assert not state_dir.exists()  # KeyboardInterrupt runs atexit, which stops the stack cleanly
    else:
        # No cleanup code ran in the parent; the next stack sweeps the dead owner's state dir.
        with EmbeddedStack(postgres=False, kafka=False):
            assert not state_dir.exists()


def test_external_or_embedded_starts_only_missing_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "OUTBOX_EMBEDDED_TEST_"
    monkeypatch.setenv(f"{prefix}REDIS_URL", "redis://redis.example:6379/3")
    monkeypatch.setenv(f"{prefix}KAFKA_BOOTSTRAP", "")
    monkeypatch.delenv(f"{prefix}DATABASE_URL", raising=False)
    assert endpoints_from_env(prefix) == {"redis_url": "redis://redis.example:6379/3"}

    endpoints, stack = external_or_embedded(prefix)
    assert stack is not None
    try:
        assert endpoints.redis_url == "redis://redis.example:6379/3"
        assert set(stack.pids()) == {"postgres", "kafka"}
        assert endpoints.database_url == stack.endpoints.database_url
        assert _port(endpoints.kafka_bootstrap) > 0
    finally:
        stack.stop()


def test_external_or_embedded_with_everything_external(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "OUTBOX_EMBEDDED_TEST_"
    expected = StackEndpoints("postgresql://db.example/app", "kafka.example:9092", "redis://redis.example/0")
    monkeypatch.setenv(f"{prefix}DATABASE_URL", expected.database_url)
    monkeypatch.setenv(f"{prefix}KAFKA_BOOTSTRAP", expected.kafka_bootstrap)
    monkeypatch.setenv(f"{prefix}REDIS_URL", expected.redis_url)

    assert external_or_embedded(prefix) == (expected, None)
