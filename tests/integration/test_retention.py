"""The leader's retention clean-up of the control tables (relay/maintenance.py, OUTBOX_*_RETENTION),
against real PostgreSQL: rows older than the retention go, newer ones stay, in batches; a dead letter
that is being replayed, and the replay records of a dead letter that still exists, stay; 0 keeps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from relay.config import RelaySettings
from relay.maintenance import Maintenance
from relay.store import RelayStore

DAY = 86_400


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[RelayStore]:
    s = RelayStore(database_url, schema, pool_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def settings(database_url: str, schema: str, **values: object) -> RelaySettings:
    return RelaySettings(database_url=SecretStr(database_url), schema_name=schema, **values)  # type: ignore[arg-type]


async def add_audit(pg: asyncpg.Connection, schema: str, age_days: float, count: int) -> None:
    await pg.execute(
        f'INSERT INTO "{schema}".audit_log (at, actor, action)'
        " SELECT now() - make_interval(secs => $1), 'tester', 'Pause' FROM generate_series(1, $2)",
        age_days * DAY,
        count,
    )


async def add_dead_letter(pg: asyncpg.Connection, schema: str, age_days: float) -> int:
    return int(
        await pg.fetchval(
            f'INSERT INTO "{schema}".dead_letter_archive (outbox_id, message_id, topic, key, payload, created_at,'
            " attempts, reason, archived_at, archived_by)"
            " VALUES (1, gen_random_uuid(), 'orders', 'k', '\\x00', now(), 1, 'test',"
            " now() - make_interval(secs => $1), 'tester') RETURNING id",
            age_days * DAY,
        )
    )


async def add_replay(
    pg: asyncpg.Connection, schema: str, dead_letter_id: int, age_days: float, *, pending: bool
) -> uuid.UUID:
    """A replay record of `dead_letter_id`; with `pending`, its new outbox row is not yet published."""
    new_id = uuid.uuid4()
    request = f"req-{new_id.hex[:8]}"
    await pg.execute(
        f'INSERT INTO "{schema}".replay_log (dead_letter_id, request_id, original_message_id, new_message_id,'
        " forced, replayed_by, replayed_at) VALUES ($1, $2, gen_random_uuid(), $3, true, 'tester',"
        " now() - make_interval(secs => $4))",
        dead_letter_id,
        request,
        new_id,
        age_days * DAY,
    )
    await pg.execute(
        f'INSERT INTO "{schema}".replay_requests (request_id, request_hash, result, requested_by, created_at)'
        " VALUES ($1, 'h', '{}'::jsonb, 'tester', now() - make_interval(secs => $2))",
        request,
        age_days * DAY,
    )
    if pending:
        await pg.execute(
            f'INSERT INTO "{schema}".outbox (message_id, topic, key, payload, headers)'
            " VALUES ($1, 'orders', 'k', '\\x00', jsonb_build_object('x-replay-request', $2::text))",
            new_id,
            request,
        )
    return new_id


async def count(pg: asyncpg.Connection, schema: str, table: str) -> int:
    return int(await pg.fetchval(f'SELECT count(*) FROM "{schema}".{table}'))


async def test_audit_rows_older_than_the_retention_go_in_batches(
    store: RelayStore, pg: asyncpg.Connection, database_url: str, schema: str
) -> None:
    await add_audit(pg, schema, age_days=100, count=25)
    await add_audit(pg, schema, age_days=10, count=5)
    # One batch deletes at most the batch size, oldest first.
    assert await store.cleanup_expired("audit", 90 * DAY, 10) == 10
    assert await count(pg, schema, "audit_log") == 20
    maintenance = Maintenance(store, settings(database_url, schema, cleanup_batch_size=10))
    assert (await maintenance.run_retention())["audit"] == 15
    assert await count(pg, schema, "audit_log") == 5, "the rows younger than the retention stay"
    ages = await pg.fetch(f'SELECT extract(epoch FROM now() - at) AS age FROM "{schema}".audit_log')
    assert all(r["age"] < 11 * DAY for r in ages)
    assert (await maintenance.run_retention())["audit"] == 0


async def test_dead_letters_are_kept_by_default_and_expire_when_configured(
    store: RelayStore, pg: asyncpg.Connection, database_url: str, schema: str
) -> None:
    old = [await add_dead_letter(pg, schema, age_days=40) for _ in range(3)]
    young = await add_dead_letter(pg, schema, age_days=1)
    kept = Maintenance(store, settings(database_url, schema))
    assert "dead_letters" not in await kept.run_retention(), "0 (the default) keeps dead letters forever"
    assert await count(pg, schema, "dead_letter_archive") == 4

    maintenance = Maintenance(store, settings(database_url, schema, dead_letter_retention=30 * DAY))
    assert (await maintenance.run_retention())["dead_letters"] == 3
    rows = [r["id"] for r in await pg.fetch(f'SELECT id FROM "{schema}".dead_letter_archive')]
    assert rows == [young] and young not in old


async def test_a_dead_letter_being_replayed_and_its_replay_records_stay(
    store: RelayStore, pg: asyncpg.Connection, database_url: str, schema: str
) -> None:
    replaying = await add_dead_letter(pg, schema, age_days=40)
    await add_replay(pg, schema, replaying, age_days=35, pending=True)
    replayed = await add_dead_letter(pg, schema, age_days=40)
    await add_replay(pg, schema, replayed, age_days=35, pending=False)  # its replay was published
    kept = await add_dead_letter(pg, schema, age_days=40)
    await add_replay(pg, schema, kept, age_days=35, pending=False)

    # Dead letters kept forever: their replay records stay too, whatever their age (replay-once).
    keep_dead_letters = Maintenance(store, settings(database_url, schema, replay_log_retention=30 * DAY))
    result = await keep_dead_letters.run_retention()
    assert (result["replay_log"], await count(pg, schema, "replay_log")) == (0, 3)
    assert result["replay_requests"] == 3, "request records only answer retries: they expire"

    expire = Maintenance(
        store,
        settings(database_url, schema, dead_letter_retention=30 * DAY, replay_log_retention=30 * DAY),
    )
    result = await expire.run_retention()
    assert result["dead_letters"] == 2
    left = [r["id"] for r in await pg.fetch(f'SELECT id FROM "{schema}".dead_letter_archive')]
    assert left == [replaying], "a dead letter whose replay is not yet published must stay"
    logged = [r["dead_letter_id"] for r in await pg.fetch(f'SELECT dead_letter_id FROM "{schema}".replay_log')]
    assert logged == [replaying], "replay records of deleted dead letters go, of kept ones stay"

    # Once the replayed event is published (delete mode removes its row), the dead letter can go.
    await pg.execute(f'DELETE FROM "{schema}".outbox')
    result = await expire.run_retention()
    assert (result["dead_letters"], result["replay_log"]) == (1, 1)
    assert await count(pg, schema, "dead_letter_archive") == 0
    assert await count(pg, schema, "replay_log") == 0


async def test_zero_keeps_every_table(
    store: RelayStore, pg: asyncpg.Connection, database_url: str, schema: str
) -> None:
    await add_audit(pg, schema, age_days=1000, count=3)
    dead_letter = await add_dead_letter(pg, schema, age_days=1000)
    await add_replay(pg, schema, dead_letter, age_days=1000, pending=False)
    maintenance = Maintenance(
        store,
        settings(database_url, schema, audit_retention=0, replay_log_retention=0, dead_letter_retention=0),
    )
    assert await maintenance.run_retention() == {}
    assert [await count(pg, schema, t) for t in ("audit_log", "dead_letter_archive", "replay_log")] == [3, 1, 1]


async def test_a_role_without_delete_skips_that_table_with_a_warning(
    pg: asyncpg.Connection, database_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The least-privilege relay role (docs/grants.sql) may not DELETE audit rows: the leader warns
    and goes on with the tables it may clean, instead of failing its maintenance round."""
    role = f"r_{uuid.uuid4().hex[:10]}"
    await pg.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'retention-pw-1'")
    try:
        await pg.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await pg.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
        await pg.execute(f'GRANT DELETE ON "{schema}".dead_letter_archive TO "{role}"')
        await add_audit(pg, schema, age_days=100, count=2)
        await add_dead_letter(pg, schema, age_days=100)
        parts = urlsplit(database_url)
        url = urlunsplit(parts._replace(netloc=f"{role}:retention-pw-1@{parts.netloc.rpartition('@')[2]}"))
        limited = RelayStore(url, schema, pool_size=2)
        await limited.open()
        try:
            maintenance = Maintenance(
                limited, settings(database_url, schema, replay_log_retention=0, dead_letter_retention=DAY)
            )
            with caplog.at_level("WARNING", logger="relay.maintenance"):
                assert await maintenance.run_retention() == {"dead_letters": 1}
                assert await maintenance.run_retention() == {"dead_letters": 0}, "skipped for a while"
        finally:
            await limited.close()
        warnings = [r for r in caplog.records if "retention of audit skipped" in r.getMessage()]
        assert len(warnings) == 1
        assert await count(pg, schema, "audit_log") == 2
    finally:
        await pg.execute(f'DROP OWNED BY "{role}"')
        await pg.execute(f'DROP ROLE "{role}"')
