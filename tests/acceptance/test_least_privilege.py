"""Least privilege, for real: three LOGIN roles get exactly what docs/grants.sql grants (the file the
docs tell operators to run, run here with psql), then a writer enqueues as the writer role, a relay
process publishes as the relay role, and the control plane serves as the operator role; and each
role is refused what it has no business doing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
import redis.asyncio as aioredis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from clients import AsyncControlClient, OutboxConflictError, OutboxEvent, aenqueue, aenqueue_many, enqueue
from control.server import ControlServer
from devtools.embedded import StackEndpoints
from devtools.fleet import Fleet, RelayProcess, relay_env, unique_name, wait_until
from relay.shared.dburl import sqlalchemy_url
from tests.integration.control_server import ADMIN_TOKEN, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GRANTS = ROOT / "docs" / "grants.sql"
OPERATIONS = ROOT / "docs" / "operations.md"


@dataclass(frozen=True)
class Roles:
    writer: str
    relay: str
    operator: str
    urls: dict[str, str]  # role -> database URL logging in as that role


def _url_as(database_url: str, user: str, password: str) -> str:
    parts = urlsplit(database_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _psql() -> str:
    from devtools.embedded import _postgres_bin_dir

    bundled = _postgres_bin_dir() / "psql"
    found = str(bundled) if bundled.exists() else shutil.which("psql")
    if found is None:
        pytest.skip("psql is needed to run docs/grants.sql")
    return found


def apply_grants(database_url: str, schema: str, writer: str, relay: str, operator: str) -> None:
    """docs/grants.sql exactly as the docs say to run it."""
    command = [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"schema={schema}"]
    command += ["-v", f"writer={writer}", "-v", f"relay={relay}", "-v", f"operator={operator}"]
    result = subprocess.run(
        [*command, "-f", str(GRANTS), database_url], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"psql -f docs/grants.sql failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture
def roles(database_url: str, schema: str) -> Iterator[Roles]:
    prefix = f"lp_{uuid.uuid4().hex[:8]}"
    names = {kind: f"{prefix}_{kind}" for kind in ("writer", "relay", "operator")}
    urls = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        for kind, name in names.items():
            password = f"pw-{uuid.uuid4().hex}"
            conn.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
            urls[kind] = _url_as(database_url, name, password)
    try:
        # Twice: the docs say to re-run it after every migration.
        for _ in range(2):
            apply_grants(database_url, schema, **names)
        yield Roles(**names, urls=urls)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
async def operator_server(roles: Roles, schema: str) -> AsyncIterator[ControlServer]:
    server = await start_server(roles.urls["operator"], schema)
    try:
        yield server
    finally:
        await server.stop(0)


def test_the_docs_point_to_the_grants_they_test() -> None:
    text = OPERATIONS.read_text()
    section = text[text.index("## Database roles") :]
    for name in ("grants.sql", "outbox_writer", "outbox_relay", "outbox_operator"):
        assert name in section, name


async def test_each_role_does_its_job_with_the_documented_grants_and_nothing_more(
    stack: StackEndpoints, schema: str, roles: Roles, operator_server: ControlServer, tmp_path: Path
) -> None:
    stream = unique_name("rt.")
    writer_url, relay_url, operator_url = roles.urls["writer"], roles.urls["relay"], roles.urls["operator"]
    control = AsyncControlClient(f"127.0.0.1:{operator_server.port}", token=ADMIN_TOKEN, timeout=5, retries=3)

    # --- the writer role: every driver path, the idempotent retry and the conflict check ---------
    writer = await asyncpg.connect(writer_url)
    try:
        async with writer.transaction():
            [first, parked] = await aenqueue_many(
                writer,
                [
                    OutboxEvent(
                        stream, {"n": 1}, key="k1", message_id=uuid.uuid5(uuid.NAMESPACE_URL, "lp/1")
                    ),
                    OutboxEvent(stream, {"n": 2}, key="k2"),
                ],
                schema=schema,
            )
        async with writer.transaction():
            retry = await aenqueue(
                writer, stream, {"n": 1}, key="k1", message_id=first.message_id, schema=schema
            )
            with pytest.raises(OutboxConflictError):
                await aenqueue(
                    writer, stream, {"n": 1}, key="other", message_id=first.message_id, schema=schema
                )
    finally:
        await writer.close()
    assert first.inserted and parked.inserted and not retry.inserted
    with psycopg.connect(writer_url) as conn:
        assert not enqueue(
            conn, stream, {"n": 1}, key="k1", message_id=first.message_id, schema=schema
        ).inserted
        with pytest.raises(OutboxConflictError):
            enqueue(conn, stream, b"other", key="k1", message_id=first.message_id, schema=schema)
        conn.rollback()
    engine = create_engine(sqlalchemy_url(writer_url, "psycopg"))
    try:
        with Session(engine) as session, session.begin():
            third = enqueue(session, stream, {"n": 3}, key="k1", schema=schema)
    finally:
        engine.dispose()
    assert third.inserted

    # --- the operator role, before any relay runs: status, and parking an event ------------------
    status = await control.status()
    assert status.instances == () and status.schema_version
    assert {b.topic: b.pending_count for b in status.backlog} == {stream: 3}
    summary = await control.park(parked.message_id, reason="least-privilege test", operator="tester")
    assert summary.message_id == parked.message_id

    # --- the relay role: `outbox-relay run` publishes to Redis -------------------------------------
    env = relay_env(relay_url, schema, stack.kafka_bootstrap, stack.redis_url, OUTBOX_ROUTES="rt.*=redis")
    fleet = Fleet(relay_url, schema, tmp_path, env)
    try:
        relay = fleet.spawn("lp-relay")
        await _wait_for_stream(stack.redis_url, stream, 2, relay)

        async def settled() -> bool:  # marked done up to OUTBOX_SETTLE_DELAY after the acknowledgement
            return await _outbox_count(stack.database_url, schema) == 0

        await wait_until(settled, 10, what="the published events deleted by the relay role")

        # --- the operator role while a relay runs ---------------------------------------------------
        status = await control.status()
        assert [i.instance_id for i in status.instances] == ["lp-relay"]
        locks = await control.locks()
        held = [lock for lock in locks if lock.holder == "lp-relay" and lock.name.startswith("partition:")]
        assert held, locks
        released = await control.release_lock(held[0].name, expected_holder="lp-relay", operator="tester")
        assert released.holder is None
        pause = await control.pause(stream, reason="maintenance", operator="tester")
        assert pause.topic_pattern == stream
        assert [p.topic_pattern for p in await control.pauses()] == [stream]
        assert (await control.resume(stream, operator="tester")) is not None
        dead = (await control.dead_letters(topic=stream)).items
        assert [d.message_id for d in dead] == [parked.message_id]
        assert (await control.dead_letter(dead[0].id)).payload == b'{"n":2}'
        replay = await control.replay(ids=[dead[0].id], operator="tester")
        assert replay.replayed_ids == (dead[0].id,)
        fields = await _wait_for_stream(stack.redis_url, stream, 3, relay)
        assert json.loads(fields[-1][b"headers"])["x-replayed-from"] == str(parked.message_id)
        assert (await control.purge(ids=[dead[0].id], operator="tester")).purged_count == 1
        audit = (await control.audit()).items
        assert [entry.action for entry in reversed(audit)] == [
            "DeadLetterNow",
            "ReleaseLock",
            "Pause",
            "Resume",
            "ReplayDeadLetters",
            "PurgeDeadLetters",
        ]
        relay.stop()
        assert relay.process is not None and relay.process.returncode == 0, relay.log()[-3000:]
        assert "permission denied" not in relay.log().lower(), relay.log()[-3000:]
    finally:
        fleet.stop_all()
        await control.close()

    # --- and nothing more ---------------------------------------------------------------------------
    s = f'"{schema}"'
    await _refused(
        writer_url,
        f"SELECT * FROM {s}.outbox",
        f"SELECT attempts, last_error, published_at FROM {s}.outbox",
        f"UPDATE {s}.outbox SET payload = 'x'",
        f"DELETE FROM {s}.outbox",
        f"TRUNCATE {s}.outbox",
        f"INSERT INTO {s}.outbox (topic, payload, attempts) VALUES ('t', 'x', 5)",
        f"INSERT INTO {s}.outbox (topic, payload, published_at) VALUES ('t', 'x', now())",
        f"SELECT * FROM {s}.distributed_locks",
        f"UPDATE {s}.distributed_locks SET holder = 'me'",
        f"SELECT * FROM {s}.dead_letter_archive",
        f"SELECT * FROM {s}.pauses",
        f"INSERT INTO {s}.pauses (topic_pattern, paused_by) VALUES ('*', 'me')",
        f"SELECT * FROM {s}.audit_log",
        f"SELECT * FROM {s}.relay_instances",
    )
    await _refused(
        relay_url,
        f"INSERT INTO {s}.outbox (topic, payload) VALUES ('t', 'x')",
        f"UPDATE {s}.outbox SET payload = 'forged'",
        f"UPDATE {s}.outbox SET topic = 'elsewhere'",
        f"UPDATE {s}.dead_letter_archive SET payload = 'forged'",
        f"DELETE FROM {s}.dead_letter_archive",
        f"UPDATE {s}.alembic_version SET version_num = '9999'",
        f"UPDATE {s}.relay_settings SET value = '1'",
        f"INSERT INTO {s}.audit_log (actor, action) VALUES ('relay', 'forged')",
        f"DELETE FROM {s}.replay_log",
        f"TRUNCATE {s}.outbox",
    )
    await _refused(
        operator_url,
        f"INSERT INTO {s}.relay_instances (instance_id, hostname, pid, version) VALUES ('x', 'h', 1, 'v')",
        f"DELETE FROM {s}.relay_instances",
        f"INSERT INTO {s}.distributed_locks (name) VALUES ('partition:999')",
        f"DELETE FROM {s}.distributed_locks",
        f"UPDATE {s}.alembic_version SET version_num = '9999'",
        f"UPDATE {s}.relay_settings SET value = '1'",
        f"UPDATE {s}.audit_log SET actor = 'someone else'",
        f"DELETE FROM {s}.audit_log",
        f"UPDATE {s}.replay_log SET replayed_by = 'someone else'",
        f"UPDATE {s}.dead_letter_archive SET payload = 'forged'",
        f"TRUNCATE {s}.outbox",
    )


async def test_each_role_calls_its_sql_api_functions_and_no_others(roles: Roles, schema: str) -> None:
    """docs/sql-api.md: writers publish, relays take leases and run the relay's steps, operators replay."""
    s = f'"{schema}"'
    writer = await asyncpg.connect(roles.urls["writer"])
    try:
        mid = await writer.fetchval(f"SELECT {s}.publish_outbox('orders', 'k', '{{\"id\": 1}}'::jsonb)")
        retry = f"SELECT {s}.publish_outbox('orders', 'k', '{{\"id\": 1}}'::jsonb, '{{}}', $1)"
        assert await writer.fetchval(retry, mid) == mid
        with pytest.raises(asyncpg.PostgresError) as conflict:
            await writer.fetchval(f"SELECT {s}.publish_outbox('orders', 'k', 'x'::bytea, '{{}}', $1)", mid)
        assert conflict.value.sqlstate == "OBX01"
    finally:
        await writer.close()
    lease = "partition:0"
    relay = await asyncpg.connect(roles.urls["relay"])
    try:
        token = await relay.fetchval(f"SELECT {s}.acquire_lock($1, 'r1', 30)", lease)
        assert token == 1
        assert await relay.fetchval(f"SELECT {s}.extend_lock($1, 'r1', $2, 30)", lease, token)
        await relay.fetch(f"SELECT * FROM {s}.claim_outbox_events(0, $1, 'r1', $2, 10)", lease, token)
        await relay.fetchval(f"SELECT {s}.complete_outbox_event('{{}}', $1, 'r1', $2)", lease, token)
        await relay.fetchval(
            f"SELECT {s}.record_outbox_failure('{{}}', $1, 'r1', $2, '{{}}', '{{}}')", lease, token
        )
        await relay.fetch(
            f"SELECT * FROM {s}.archive_dead_letter('{{}}', $1, 'r1', $2, '{{}}', '{{}}')", lease, token
        )
        assert await relay.fetchval(f"SELECT {s}.cleanup_expired_locks()") == 0
    finally:
        await relay.close()
    operator = await asyncpg.connect(roles.urls["operator"])
    try:
        assert await operator.fetchval(f"SELECT {s}.release_lock($1, 'r1', 1)", lease)
        await operator.fetch(
            f"SELECT * FROM {s}.record_replay(NULL, NULL, NULL, NULL, NULL, 'req', NULL, 0, 100, 10, false, 'ops')"
        )
    finally:
        await operator.close()
    await _refused(
        roles.urls["writer"],
        f"SELECT {s}.acquire_lock('partition:1', 'w', 30)",
        f"SELECT * FROM {s}.claim_outbox_events(0, 'partition:0', 'w', 1, 10)",
        f"SELECT * FROM {s}.record_replay(NULL, NULL, NULL, NULL, NULL, 'r', NULL, 0, 1, 1, false, 'w')",
    )
    await _refused(
        roles.urls["relay"],
        f"SELECT {s}.publish_outbox('t', NULL, 'x'::bytea)",
        f"SELECT * FROM {s}.record_replay(NULL, NULL, NULL, NULL, NULL, 'r', NULL, 0, 1, 1, false, 'r')",
    )
    await _refused(
        roles.urls["operator"],
        f"SELECT {s}.acquire_lock('partition:1', 'o', 30)",
        f"SELECT * FROM {s}.claim_outbox_events(0, 'partition:0', 'o', 1, 10)",
    )


async def _refused(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    allowed = []
    try:
        for statement in statements:
            try:
                async with conn.transaction():
                    await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                continue
            allowed.append(statement)
    finally:
        await conn.close()
    assert not allowed, f"{urlsplit(url).username} may run what it should not: {allowed}"


async def _wait_for_stream(
    redis_url: str, stream: str, count: int, relay: RelayProcess
) -> list[dict[Any, Any]]:
    client = aioredis.from_url(redis_url)
    entries: list[dict[Any, Any]] = []

    async def arrived() -> bool:
        nonlocal entries
        if not relay.alive():
            raise AssertionError(f"the relay exited:\n{relay.log()[-3000:]}")
        entries = [dict(fields or {}) for _, fields in await client.xrange(stream) or []]
        return len(entries) >= count

    try:
        await wait_until(arrived, 30, what=f"{count} entries in {stream}")
    finally:
        await client.aclose()
    return entries


async def _outbox_count(database_url: str, schema: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".outbox'))
    finally:
        await conn.close()


def test_psql_variables_are_the_only_placeholders() -> None:
    """The file names no schema or role of its own: everything comes from the -v variables."""
    sql = "\n".join(line for line in GRANTS.read_text().splitlines() if not line.lstrip().startswith("--"))
    assert "outbox." not in sql
    # Role names of its own (the SQL API's function names, like publish_outbox, are the schema's).
    assert not re.search(r"\boutbox_(writer|relay|operator)", sql)
