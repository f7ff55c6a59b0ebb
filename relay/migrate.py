"""Schema migrations: Alembic, serialised across instances by a Postgres advisory lock."""

from __future__ import annotations

import io
import logging
import time
from importlib import resources
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text

from relay.config import DatabaseSettings
from relay.dburl import redact, sqlalchemy_url

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


def head_revision() -> str:
    script = ScriptDirectory(str(resources.files("relay") / "migrations"))
    head = script.get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    script = ScriptDirectory(str(resources.files("relay") / "migrations"))
    return {rev.revision for rev in script.walk_revisions()}


def schema_state(revision: str | None) -> str:
    """'current', 'behind' (an older revision we know, or none), or 'ahead' (a revision this
    version does not know: a newer release migrated it, as during a rolling upgrade)."""
    if revision == head_revision():
        return "current"
    if revision is None or revision in known_revisions():
        return "behind"
    return "ahead"


def current_revision(connection: Connection, schema: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


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


def downgrade(settings: DatabaseSettings, revision: str, *, lock_wait: float = 300.0) -> str | None:
    config = alembic_config(settings)
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    try:
        with engine.connect() as lock_conn:
            lock_conn.execution_options(isolation_level="AUTOCOMMIT")
            _acquire_migration_lock(lock_conn, settings.schema_name, lock_wait)
            try:
                with engine.begin() as conn:
                    config.attributes["connection"] = conn
                    command.downgrade(config, revision)
                    return current_revision(conn, settings.schema_name)
            finally:
                lock_conn.execute(
                    text(f"SELECT pg_advisory_unlock({LOCK_KEY_SQL})"), {"schema": settings.schema_name}
                )
    finally:
        engine.dispose()


def offline_sql(settings: DatabaseSettings, revision: str = "head", *, partitions: int = 16) -> str:
    """The SQL an upgrade would run, for review; touches no database."""
    buffer = io.StringIO()
    config = alembic_config(settings, partitions)
    config.output_buffer = buffer
    command.upgrade(config, revision, sql=True)
    return f'CREATE SCHEMA IF NOT EXISTS "{settings.schema_name}";\n\n' + buffer.getvalue()


def write_offline_sql(
    settings: DatabaseSettings, out: TextIO, revision: str = "head", partitions: int = 16
) -> None:
    out.write(offline_sql(settings, revision, partitions=partitions))


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


def describe_target(settings: DatabaseSettings) -> str:
    return redact(settings.database_url.get_secret_value())
