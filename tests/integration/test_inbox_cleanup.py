"""The inbox's retention clean-up (issue 14): only processed rows older than the retention go, in
small batches, while a consumer keeps processing; `outbox-relay inbox-cleanup` and the relay leader
run it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr

from clients.inbox import AsyncInbox, InboxMessage, InboxOutcome
from relay.config import RelaySettings
from relay.maintenance import Maintenance, cleanup_inbox
from relay.store import RelayStore

ROOT = Path(__file__).resolve().parents[2]
EXPIRED = 2500  # processed 8 days ago: past the 7-day retention
BATCH = 200


async def seed(pg: asyncpg.Connection, schema: str) -> None:
    """EXPIRED processed rows past the retention; and rows that must stay: processed a day ago, and
    processing (stale or not) and failed rows however old."""
    table = f'"{schema}".inbox'
    await pg.execute(
        f"INSERT INTO {table} (consumer, message_id, status, attempts, received_at, processed_at)"
        " SELECT 'billing', 'old-' || i, 'processed', 1, now() - interval '8 days',"
        "        now() - interval '8 days' + i * interval '1 ms'"
        f" FROM generate_series(1, {EXPIRED}) i"
    )
    await pg.execute(
        f"INSERT INTO {table} (consumer, message_id, status, attempts, received_at, processed_at)"
        " SELECT 'billing', 'recent-' || i, 'processed', 1, now() - interval '1 day', now() - interval '1 day'"
        " FROM generate_series(1, 300) i"
    )
    await pg.execute(
        f"INSERT INTO {table} (consumer, message_id, status, attempts, received_at, locked_at, locked_by)"
        " SELECT 'billing', 'stuck-' || i, 'processing', 1, now() - interval '30 days',"
        "        now() - interval '30 days', 'dead-worker'"
        " FROM generate_series(1, 50) i"
    )
    await pg.execute(
        f"INSERT INTO {table} (consumer, message_id, status, attempts, last_error, received_at)"
        " SELECT 'billing', 'failed-' || i, 'failed', 5, 'Boom', now() - interval '30 days'"
        " FROM generate_series(1, 50) i"
    )


async def remaining(pg: asyncpg.Connection, schema: str) -> dict[str, int]:
    rows = await pg.fetch(
        f"SELECT split_part(message_id, '-', 1) AS kind, count(*) AS n FROM \"{schema}\".inbox"
        " WHERE message_id ~ '^(old|recent|stuck|failed)-' GROUP BY 1"
    )
    return {row["kind"]: int(row["n"]) for row in rows}


async def test_cleanup_removes_only_expired_processed_rows_in_batches_while_consumers_run(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    await seed(pg, schema)
    await pg.execute(f'CREATE TABLE "{schema}".effects (message_id text NOT NULL)')
    store = RelayStore(database_url, schema, pool_size=2)
    await store.open()
    inbox = AsyncInbox("billing", schema=schema)
    outcomes: list[InboxOutcome] = []
    cleaning = asyncio.Event()
    finished = asyncio.Event()

    async def handler(conn: asyncpg.Connection, message: InboxMessage) -> None:
        await conn.execute(f'INSERT INTO "{schema}".effects VALUES ($1)', message.message_id)

    async def consume() -> int:
        """Processes new messages (and redeliveries of recent ones) for as long as the clean-up runs."""
        during = 0
        conn = await asyncpg.connect(database_url)
        try:
            await cleaning.wait()
            while not finished.is_set():
                for message_id in (str(uuid.uuid4()), f"recent-{len(outcomes) % 300 + 1}"):
                    m = InboxMessage(message_id, "orders", None, b"{}", {})
                    outcomes.append((await inbox.process(conn, m, handler)).outcome)
                during += 1
        finally:
            await conn.close()
        return during

    async def clean() -> Any:
        cleaning.set()
        try:
            return await cleanup_inbox(store, 7 * 86_400, BATCH, pause=0.02)
        finally:
            finished.set()

    try:
        consumer = asyncio.create_task(consume())
        report = await asyncio.wait_for(clean(), 120)
        rounds = await asyncio.wait_for(consumer, 60)
    finally:
        await store.close()

    assert report.deleted == EXPIRED
    assert report.batches == EXPIRED // BATCH + 1  # full batches, then a short one
    assert await remaining(pg, schema) == {"recent": 300, "stuck": 50, "failed": 50}
    # The consumer kept processing throughout: new messages processed, recent ones still duplicates.
    assert rounds >= 2
    assert outcomes.count(InboxOutcome.PROCESSED) == rounds
    assert outcomes.count(InboxOutcome.DUPLICATE) == rounds


async def test_the_command_dry_run_then_clean_up(database_url: str, schema: str, pg: asyncpg.Connection) -> None:
    await seed(pg, schema)
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_SCHEMA": schema,
        "OUTBOX_INBOX_CLEANUP_BATCH_SIZE": "1000",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "outbox_relay", "inbox-cleanup"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    dry = run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        f"dry run: {EXPIRED} processed rows older than 604800 s would be deleted (in batches of 1000);"
        " kept: 300 processed within the retention, 50 processing, 50 failed"
    ) in dry.stdout
    assert await remaining(pg, schema) == {"old": EXPIRED, "recent": 300, "stuck": 50, "failed": 50}

    done = run("--batch-size", "700", "--pause", "0")
    assert done.returncode == 0, done.stderr
    assert f"deleted {EXPIRED} processed inbox rows older than 604800 s in 4 batches" in done.stdout
    assert await remaining(pg, schema) == {"recent": 300, "stuck": 50, "failed": 50}

    # A shorter retention reaches the recent ones too; never the processing or failed ones.
    shorter = run("--retention", "3600")
    assert shorter.returncode == 0, shorter.stderr
    assert "deleted 300 processed inbox rows older than 3600 s in 1 batches" in shorter.stdout
    assert await remaining(pg, schema) == {"stuck": 50, "failed": 50}

    bad = run("--batch-size", "0")
    assert bad.returncode == 2 and "batch-size" in bad.stderr


async def test_the_leader_cleans_up_and_counts_stale_locks(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    await seed(pg, schema)
    settings = RelaySettings(
        database_url=SecretStr(database_url),
        schema_name=schema,
        inbox_cleanup=True,
        inbox_cleanup_batch_size=1000,
        inbox_lock_stale_threshold=60,
    )
    store = RelayStore(database_url, schema, pool_size=2)
    await store.open()
    try:
        maintenance = Maintenance(store, settings)
        await maintenance.run_once()
        assert await remaining(pg, schema) == {"recent": 300, "stuck": 50, "failed": 50}
        assert maintenance.gauges.inbox_stale_locks == [("billing", 50)]
        # Resolved stale locks report 0 rather than vanishing.
        await pg.execute(f"UPDATE \"{schema}\".inbox SET locked_at = NULL, locked_by = NULL WHERE message_id LIKE 'stuck-%'")
        await maintenance.run_once()
        assert maintenance.gauges.inbox_stale_locks == [("billing", 0)]
        # Off by default: the leader leaves the inbox alone.
        await pg.execute(f"UPDATE \"{schema}\".inbox SET processed_at = now() - interval '9 days' WHERE status = 'processed'")
        await Maintenance(store, settings.model_copy(update={"inbox_cleanup": False})).run_once()
        assert (await remaining(pg, schema))["recent"] == 300
    finally:
        await store.close()
