"""Schema migrations: Alembic, serialised across instances by a Postgres advisory lock."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text

from relay import __version__
from relay.config import DatabaseSettings
from relay.schema_version import head_revision, schema_state
from relay.shared.dburl import sqlalchemy_url

log = logging.getLogger(__name__)

LOCK_KEY_SQL = "hashtext('outbox-relay:migrate:' || :schema)"


class MigrationLockTimeout(RuntimeError):
    pass


def alembic_config(settings: DatabaseSettings, partitions: int = 16) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("relay") / "migrations"))
    # ConfigParser interpolation would choke on '%' in passwords.
    config.set_main_option(
        "sqlalchemy.url", sqlalchemy_url(settings.database_url.get_secret_value()).replace("%", "%%")
    )
    config.attributes["schema"] = settings.schema_name
    config.attributes["partitions"] = partitions
    return config


def current_revision(connection: Connection, schema: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


@dataclass(frozen=True)
class SchemaStatus:
    schema: str
    current: str | None
    head: str
    state: str  # as schema_state: 'current', 'behind' or 'ahead'
    pending: tuple[str, ...]  # the migrations `upgrade` would run, oldest first


def status(settings: DatabaseSettings) -> SchemaStatus:
    """Where the schema stands against this version's head; reads only (no lock, creates nothing)."""
    engine = create_engine(sqlalchemy_url(settings.database_url.get_secret_value()), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            current = current_revision(conn, settings.schema_name)
    finally:
        engine.dispose()
    state = schema_state(current)
    pending: tuple[str, ...] = ()
    if state == "behind":
        pending = tuple(target for _, target in _offline_steps(f"{current or 'base'}:head", False) if target)
    return SchemaStatus(settings.schema_name, current, head_revision(), state, pending)


def upgrade(
    settings: DatabaseSettings,
    revision: str = "head",
    *,
    partitions: int = 16,
    lock_wait: float = 300.0,
    lock_timeout: str = "10s",
    statement_timeout: str = "10min",
) -> str | None:
    """Upgrade to `revision`. Safe to run from many processes at once: one migrates, the others wait
    for it and then find nothing to do. Returns the revision the schema ends at."""
    config = alembic_config(settings, partitions)
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    try:
        with engine.connect() as lock_conn:
            lock_conn.execution_options(isolation_level="AUTOCOMMIT")
            _acquire_migration_lock(lock_conn, settings.schema_name, lock_wait)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"SET LOCAL lock_timeout = '{lock_timeout}'"))
                    conn.execute(text(f"SET LOCAL statement_timeout = '{statement_timeout}'"))
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema_name}"'))
                    before = current_revision(conn, settings.schema_name)
                    target = head_revision() if revision == "head" else revision
                    if before == target:
                        log.info("schema %s already at %s, nothing to do", settings.schema_name, before)
                        return before
                    log.info("migrating schema %s from %s to %s", settings.schema_name, before, target)
                    config.attributes["connection"] = conn
                    command.upgrade(config, revision)
                    return current_revision(conn, settings.schema_name)
            finally:
                lock_conn.execute(
                    text(f"SELECT pg_advisory_unlock({LOCK_KEY_SQL})"), {"schema": settings.schema_name}
                )
    finally:
        engine.dispose()


def downgrade(
    settings: DatabaseSettings,
    revision: str,
    *,
    lock_wait: float = 300.0,
    lock_timeout: str = "10s",
    statement_timeout: str = "10min",
) -> str | None:
    config = alembic_config(settings)
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    try:
        with engine.connect() as lock_conn:
            lock_conn.execution_options(isolation_level="AUTOCOMMIT")
            _acquire_migration_lock(lock_conn, settings.schema_name, lock_wait)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"SET LOCAL lock_timeout = '{lock_timeout}'"))
                    conn.execute(text(f"SET LOCAL statement_timeout = '{statement_timeout}'"))
                    config.attributes["connection"] = conn
                    command.downgrade(config, revision)
                    return current_revision(conn, settings.schema_name)
            finally:
                lock_conn.execute(
                    text(f"SELECT pg_advisory_unlock({LOCK_KEY_SQL})"), {"schema": settings.schema_name}
                )
    finally:
        engine.dispose()


def offline_sql(
    settings: DatabaseSettings,
    revision: str = "head",
    *,
    partitions: int = 16,
    downgrade: bool = False,
    lock_wait: float = 300.0,
    lock_timeout: str = "10s",
    statement_timeout: str = "10min",
) -> str:
    """The SQL an upgrade (or a downgrade) would run, for review and for `psql -v ON_ERROR_STOP=1 -f`;
    touches no database.

    `revision` is the target (upgrade: from an empty schema; downgrade: from head), or `from:to`.
    As `upgrade` does online, each migration runs in its own transaction that first takes the
    schema's migration lock (the same key, so `outbox-relay migrate` and other sessions applying
    this SQL wait for each other) and sets the same timeouts. It then checks that the schema is at
    the revision the step starts from, so a step is never applied twice or to another revision: a
    second session applying the same file waits, then stops with an error and changes nothing."""
    steps = _offline_steps(revision, downgrade)
    config = alembic_config(settings, partitions)
    schema = settings.schema_name
    direction = "downgrade" if downgrade else "upgrade"
    first, last = steps[0][0] if steps else None, steps[-1][1] if steps else None
    count = f"{len(steps)} migration{'s' if len(steps) != 1 else ''}"
    if steps and steps[0][0] is None and not downgrade:
        count += f", {partitions} partitions"
    header = (
        f'-- outbox-relay {__version__}: {direction} of schema "{schema}" from {first or "base"}'
        f" to {last or 'base'} ({count}).\n"
        "-- Apply with: psql -v ON_ERROR_STOP=1 -f FILE (each migration is one transaction).\n\n"
    )
    chunks = [header]
    for number, (source, target) in enumerate(steps):
        buffer = io.StringIO()
        config.output_buffer = buffer
        run = command.downgrade if downgrade else command.upgrade
        run(config, f"{source or 'base'}:{target or 'base'}", sql=True)
        chunk = buffer.getvalue()
        if not (chunk.startswith(_BEGIN) and chunk.endswith(_COMMIT)):  # Alembic changed its output
            raise RuntimeError(f"unexpected offline SQL for {source} -> {target}:\n{chunk[:200]}")
        prologue = _step_prologue(
            schema,
            source,
            create_schema=not downgrade and number == 0,
            lock_wait=lock_wait,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
        )
        chunks.append(_BEGIN + prologue + chunk[len(_BEGIN) :])
    return "".join(chunks)


_BEGIN = "BEGIN;\n\n"
_COMMIT = "COMMIT;\n\n"


def _offline_steps(revision: str, downgrade: bool) -> list[tuple[str | None, str | None]]:
    """(from, to) of each migration between the revisions `revision` names, in the order they run."""
    if ":" in revision:
        source, _, target = revision.partition(":")
    else:
        source, target = ("head" if downgrade else "base"), revision
    script = ScriptDirectory(str(resources.files("relay") / "migrations"))

    def resolve(name: str) -> str | None:
        if name in ("", "base"):
            return None
        found = script.get_revision(name)
        if found is None:
            raise ValueError(f"unknown revision {name!r}")
        return found.revision

    lower, upper = (resolve(target), resolve(source)) if downgrade else (resolve(source), resolve(target))
    if upper is None:
        return []
    revisions = list(script.iterate_revisions(upper, lower))  # upper first
    if downgrade:
        return [(rev.revision, _down_revision(rev.down_revision)) for rev in revisions]
    return [(_down_revision(rev.down_revision), rev.revision) for rev in reversed(revisions)]


def _down_revision(down: str | Sequence[str] | None) -> str | None:
    if down is not None and not isinstance(down, str):  # a merge point; the history is linear so far
        raise ValueError(f"offline SQL cannot cross the merge of {', '.join(down)}")
    return down


def _step_prologue(
    schema: str,
    expected: str | None,
    *,
    create_schema: bool,
    lock_wait: float,
    lock_timeout: str,
    statement_timeout: str,
) -> str:
    """What `upgrade` does online before each migration: the lock, the timeouts, the revision check."""
    lock_key = LOCK_KEY_SQL.replace(":schema", f"'{schema}'")
    version_table = f'"{schema}".alembic_version'
    expected_sql = "IS NOT NULL" if expected is None else f"IS DISTINCT FROM '{expected}'"
    statements = [
        "-- One migration of this schema at a time (the lock `outbox-relay migrate` takes), with its"
        "\n-- timeouts, and only from the revision this migration starts from.",
        f"SET LOCAL statement_timeout = '{statement_timeout}';",
        f"SET LOCAL lock_timeout = '{lock_wait:g}s';",
        f"""DO $outbox_relay$
DECLARE
    found text;
BEGIN
    PERFORM pg_advisory_xact_lock({lock_key});
    IF to_regclass('{version_table}') IS NOT NULL THEN
        SELECT string_agg(version_num, ', ') INTO found FROM {version_table};
    END IF;
    IF found {expected_sql} THEN
        RAISE EXCEPTION 'schema "{schema}" is at revision %, this migration starts from {expected or "none"}',
            coalesce(found, 'none')
            USING HINT = 'Another session migrated it, or this SQL is for another revision: '
                || 'see outbox-relay migrate --status.';
    END IF;
END
$outbox_relay$;""",
        f"SET LOCAL lock_timeout = '{lock_timeout}';",
    ]
    if create_schema:
        statements.append(f'CREATE SCHEMA IF NOT EXISTS "{schema}";')
    return "\n\n".join(statements) + "\n\n"


def _acquire_migration_lock(conn: Connection, schema: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        got = conn.execute(text(f"SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"), {"schema": schema}).scalar()
        if got:
            return
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout(
                f"another process has held the migration lock of schema {schema!r} for over {wait:.0f}s"
            )
        log.info("waiting for another instance to finish migrating schema %s", schema)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
