"""The inbox under concurrency and crashes (issue 14), with real connections and a real process:
two workers receiving the same message at the same moment run its business effect once (the other is
told, and logs, that it is locked by another worker); a worker killed with kill -9 in the middle of
its handler keeps the message locked until the stale threshold, after which another worker takes it
over and runs the effect, once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from clients.inbox import AsyncInbox, Inbox, InboxMessage, InboxOutcome, InboxResult
from devtools.fleet import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 12  # messages raced for; each round is two workers released by one barrier
THRESHOLD = 2.0  # the stale threshold of the kill -9 test, seconds


def message(message_id: str) -> InboxMessage:
    return InboxMessage(message_id=message_id, topic="orders", key="k1", payload=b"{}", headers={}, source="test")


@pytest.fixture
async def effects(pg: asyncpg.Connection, schema: str) -> str:
    # No unique constraint: a second business effect must show up as a second row.
    await pg.execute(
        f'CREATE TABLE "{schema}".effects (id serial PRIMARY KEY, message_id text NOT NULL, who text NOT NULL)'
    )
    return f'"{schema}".effects'


async def effects_by_message(pg: asyncpg.Connection, table: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in await pg.fetch(f"SELECT message_id, who FROM {table} ORDER BY id"):
        found.setdefault(row["message_id"], []).append(row["who"])
    return found


async def test_two_async_workers_receive_the_same_message_at_the_same_moment(
    database_url: str, schema: str, effects: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clients.inbox")
    names = ("worker-a", "worker-b")
    inboxes = {name: AsyncInbox("billing", schema=schema, worker_id=name) for name in names}
    conns = {name: await asyncpg.connect(database_url) for name in names}
    ids = [str(uuid.uuid4()) for _ in range(ROUNDS)]
    outcomes: list[dict[str, InboxResult]] = []
    try:
        for message_id in ids:
            barrier = asyncio.Barrier(2)
            done = {name: asyncio.Event() for name in names}

            async def run(me: str, other: str, message_id: str = message_id, barrier: asyncio.Barrier = barrier,
                          done: dict[str, asyncio.Event] = done) -> InboxResult:
                async def handler(conn: asyncpg.Connection, m: InboxMessage) -> None:
                    await conn.execute(f"INSERT INTO {effects} (message_id, who) VALUES ($1, $2)", m.message_id, me)
                    # Hold the claim until the other worker is through: it must meet the lock, not the
                    # processed row. Were both claimed, both would wait here and time out (FAILED).
                    await asyncio.wait_for(done[other].wait(), 10)

                try:
                    await barrier.wait()
                    return await inboxes[me].process(conns[me], message(message_id), handler)
                finally:
                    done[me].set()

            a, b = await asyncio.gather(run("worker-a", "worker-b"), run("worker-b", "worker-a"))
            outcomes.append({"worker-a": a, "worker-b": b})
    finally:
        for conn in conns.values():
            await conn.close()

    found = await effects_by_message(pg, effects)
    winners = []
    for message_id, results in zip(ids, outcomes, strict=True):
        by_outcome = {result.outcome: name for name, result in results.items()}
        assert set(by_outcome) == {InboxOutcome.PROCESSED, InboxOutcome.LOCKED}, results
        winner, loser = by_outcome[InboxOutcome.PROCESSED], by_outcome[InboxOutcome.LOCKED]
        assert results[loser].holder == winner
        assert found[message_id] == [winner]  # the business effect, once, by the winner
        assert f"locked by another worker ({winner})" in caplog.text
        winners.append(winner)
    assert len(found) == ROUNDS


def test_two_sync_workers_in_threads_race_for_the_same_messages(
    database_url: str, schema: str, effects: str
) -> None:
    """The synchronous inbox (psycopg), two threads released together on every message."""
    names = ("thread-a", "thread-b")
    ids = [str(uuid.uuid4()) for _ in range(ROUNDS)]
    results: dict[str, list[InboxResult]] = {name: [] for name in names}
    barrier = threading.Barrier(2, timeout=30)
    done = {(name, message_id): threading.Event() for name in names for message_id in ids}
    errors: list[BaseException] = []

    def run(me: str, other: str) -> None:
        inbox = Inbox("billing", schema=schema, worker_id=me)

        def handler(conn: psycopg.Connection[Any], m: InboxMessage) -> None:
            conn.execute(f"INSERT INTO {effects} (message_id, who) VALUES (%s, %s)", (m.message_id, me))
            assert done[(other, m.message_id)].wait(10), "both workers ran the handler"

        try:
            with psycopg.connect(database_url) as conn:
                for message_id in ids:
                    barrier.wait()
                    try:
                        results[me].append(inbox.process(conn, message(message_id), handler))
                    finally:
                        done[(me, message_id)].set()
        except BaseException as error:  # reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=pair) for pair in (names, names[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f"SELECT message_id, who FROM {effects}").fetchall()
    assert sorted(mid for mid, _ in rows) == sorted(ids)  # one effect per message
    by_message: dict[str, str] = {mid: who for mid, who in rows}
    for index, message_id in enumerate(ids):
        pair = {name: results[name][index] for name in names}
        outcomes = sorted(result.outcome.value for result in pair.values())
        assert outcomes == ["locked", "processed"], pair
        [winner] = [name for name, result in pair.items() if result.outcome is InboxOutcome.PROCESSED]
        assert by_message[message_id] == winner


# A worker that claims the message and dies in the middle of its handler: it writes its business row,
# says so through a marker file, and blocks until it is killed.
DOOMED = textwrap.dedent("""
    import asyncio, pathlib, sys
    import asyncpg
    from clients.inbox import AsyncInbox, InboxMessage

    url, schema, message_id, marker, threshold = sys.argv[1:6]

    async def main():
        conn = await asyncpg.connect(url)
        inbox = AsyncInbox("billing", schema=schema, worker_id="doomed-worker",
                           lock_stale_threshold=float(threshold))

        async def handler(c, m):
            await c.execute(f'INSERT INTO "{schema}".effects (message_id, who) VALUES ($1, $2)',
                            m.message_id, "doomed-worker")
            pathlib.Path(marker).write_text("in the handler")
            await asyncio.sleep(3600)

        await inbox.process(conn, InboxMessage(message_id, "orders", "k1", b"{}", {}), handler)

    asyncio.run(main())
""")


async def test_a_worker_killed_in_its_handler_is_taken_over_once_its_lock_is_stale(
    database_url: str, schema: str, effects: str, pg: asyncpg.Connection, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="clients.inbox")
    message_id = str(uuid.uuid4())
    marker = tmp_path / "in-handler"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    survivor = AsyncInbox("billing", schema=schema, worker_id="survivor", lock_stale_threshold=THRESHOLD)
    conn = await asyncpg.connect(database_url)

    async def handler(c: asyncpg.Connection, m: InboxMessage) -> None:
        await c.execute(f"INSERT INTO {effects} (message_id, who) VALUES ($1, $2)", m.message_id, "survivor")

    stderr = tmp_path / "doomed.err"
    with stderr.open("wb") as err:
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DOOMED, database_url, schema, message_id, str(marker), str(THRESHOLD),
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        async def in_handler() -> bool:
            assert doomed.returncode is None, stderr.read_text()
            return await asyncio.to_thread(marker.exists)

        await wait_until(in_handler, timeout=60, interval=0.02, what="the doomed worker inside its handler")
        os.kill(doomed.pid, signal.SIGKILL)
        await asyncio.wait_for(doomed.wait(), 30)
        killed_at = time.monotonic()

        # Right after the crash the lock is young: the survivor must not touch the message.
        first = await survivor.process(conn, message(message_id), handler)
        assert first.outcome is InboxOutcome.LOCKED and first.holder == "doomed-worker", first
        assert time.monotonic() - killed_at < THRESHOLD, "too slow to observe the young lock"
        assert "locked by another worker (doomed-worker)" in caplog.text

        results: list[InboxResult] = []

        async def taken_over() -> bool:
            results.append(await survivor.process(conn, message(message_id), handler))
            return results[-1].outcome is not InboxOutcome.LOCKED

        await wait_until(taken_over, timeout=60, interval=0.1, what="the survivor taking the message over")
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await asyncio.wait_for(doomed.wait(), 30)
        await conn.close()

    assert results[-1] == InboxResult(InboxOutcome.PROCESSED, 2, previous_holder="doomed-worker")
    row = await pg.fetchrow(
        f'SELECT status, attempts, received_at, processed_at FROM "{schema}".inbox WHERE message_id = $1', message_id
    )
    assert row is not None and (row["status"], row["attempts"]) == ("processed", 2)
    # Taken over only once the doomed worker's claim was older than the threshold.
    assert (row["processed_at"] - row["received_at"]).total_seconds() >= THRESHOLD
    # The doomed worker's business row died with its transaction: the effect exists once.
    assert (await effects_by_message(pg, effects)) == {message_id: ["survivor"]}
    assert "took over message" in caplog.text and "from worker doomed-worker" in caplog.text
