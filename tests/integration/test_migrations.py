"""The migrations against real PostgreSQL, and the constraints of the outbox table that writers in any
language rely on (docs/outbox-table.md)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from importlib import resources

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import errors
from pydantic import SecretStr

from relay import migrate
from relay.config import DatabaseSettings
from relay.schema_version import head_revision

PARTITIONS = 16
PLAIN_INSERT = (
    "INSERT INTO {s}.outbox (topic, key, payload) VALUES ('orders', 'order-1', convert_to('{{\"id\":1}}', 'UTF8'))"
    " RETURNING id, message_id, partition"
)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def _relations(conn: psycopg.Connection, schema: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s",
        (schema,),
    ).fetchall()
    return {name: kind for name, kind in rows}


SQL_API_FUNCTIONS = (
    "_publish_outbox",
    "publish_outbox",
    "acquire_lock",
    "extend_lock",
    "extend_locks",
    "release_lock",
    "release_locks",
    "cleanup_expired_locks",
    "claim_outbox_events",
    "complete_outbox_event",
    "record_outbox_failure",
    "archive_dead_letter",
    "record_replay",
)


def _functions(conn: psycopg.Connection, schema: str) -> list[str]:
    rows = conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
        (schema,),
    ).fetchall()
    return [row[0] for row in rows]


def schema_snapshot(conn: psycopg.Connection, schema: str) -> dict[str, object]:
    """Everything the migrations define in `schema` (relations, columns with their types, defaults and
    generation expressions, constraints, indexes, functions, triggers) and the rows they write
    (relay_settings, alembic_version), with the schema's name replaced by <schema>: schemas migrated
    by different paths (online, or their SQL applied with psql) compare equal when they are the same."""

    def rows(sql: str) -> list[tuple[object, ...]]:
        found = conn.execute(sql, {"schema": schema} if "%(schema)s" in sql else None).fetchall()
        return sorted(tuple(_unnamed(value, schema) for value in row) for row in found)

    relations = _relations(conn, schema)
    snapshot: dict[str, object] = {
        "relations": {name: kind for name, kind in relations.items()},
        "columns": rows(
            "SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid)"
            " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            " WHERE n.nspname = %(schema)s AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')"
        ),
        "constraints": rows(
            "SELECT c.relname, con.conname, pg_get_constraintdef(con.oid) FROM pg_constraint con"
            " JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = con.connamespace"
            " WHERE n.nspname = %(schema)s"
        ),
        "indexes": rows("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(schema)s"),
        "functions": rows(
            "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s"
        ),
        "triggers": rows(
            "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %(schema)s AND NOT t.tgisinternal"
        ),
    }
    for table in ("relay_settings", "alembic_version"):
        if table in relations:
            snapshot[table] = rows(f'SELECT * FROM "{schema}".{table}')
    return snapshot


def _unnamed(value: object, schema: str) -> object:
    return value.replace(schema, "<schema>") if isinstance(value, str) else value


def test_upgrade_to_head_then_downgrade_to_base_leaves_no_tables(
    database_url: str, db: psycopg.Connection
) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    try:
        assert migrate.upgrade(settings) == head_revision()
        tables = {rel for rel, kind in _relations(db, name).items() if kind == "r"}
        assert {"outbox", "distributed_locks", "dead_letter_archive", "inbox", "alembic_version"} <= tables
        # The insert trigger's function, and the SQL API of migration 0005 (docs/sql-api.md).
        assert sorted(set(_functions(db, name))) == sorted(["notify_outbox_inserted", *SQL_API_FUNCTIONS])

        assert migrate.downgrade(settings, "base") is None

        # Alembic keeps its (now empty) version table; nothing of the relay's is left.
        remaining = {rel: kind for rel, kind in _relations(db, name).items() if kind in ("r", "p", "v", "S")}
        assert remaining == {"alembic_version": "r"}
        assert db.execute(f'SELECT count(*) FROM "{name}".alembic_version').fetchone() == (0,)
        assert _functions(db, name) == []
        # And head can be reached again from there.
        assert migrate.upgrade(settings) == head_revision()
        assert "outbox" in _relations(db, name)
    finally:
        db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_upgrade_is_a_no_op_at_head(database_url: str, schema: str, db: psycopg.Connection) -> None:
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=schema)
    assert migrate.upgrade(settings) == head_revision()
    assert db.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall() == [
        (head_revision(),)
    ]


def test_partition_is_computed_for_plain_sql_inserts(schema: str, db: psycopg.Connection) -> None:
    first = db.execute(PLAIN_INSERT.format(s=schema)).fetchone()
    second = db.execute(PLAIN_INSERT.format(s=schema)).fetchone()
    assert first is not None and second is not None

    assert 0 <= first[2] < PARTITIONS
    assert second[2] == first[2], "the same key must always map to the same partition"
    assert second[0] > first[0]
    expected = db.execute("SELECT (hashtext('order-1')::bigint & 2147483647) %% %s", (PARTITIONS,)).fetchone()
    assert expected == (first[2],)


def test_keyless_events_get_a_partition_from_their_message_id(schema: str, db: psycopg.Connection) -> None:
    rows = db.execute(
        f"INSERT INTO {schema}.outbox (topic, payload)"
        " SELECT 'orders', convert_to(g::text, 'UTF8') FROM generate_series(1, 200) g"
        " RETURNING message_id, partition, (hashtext(message_id::text)::bigint & 2147483647) % 16"
    ).fetchall()
    assert all(0 <= partition < PARTITIONS and partition == expected for _, partition, expected in rows)
    assert len({partition for _, partition, _ in rows}) > 1, "keyless events must spread over partitions"


def test_message_id_defaults_to_a_fresh_uuid(schema: str, db: psycopg.Connection) -> None:
    first = db.execute(PLAIN_INSERT.format(s=schema)).fetchone()
    second = db.execute(PLAIN_INSERT.format(s=schema)).fetchone()
    assert first is not None and second is not None
    assert isinstance(first[1], uuid.UUID)
    assert first[1] != second[1]


def test_defaults_of_a_plain_insert(schema: str, db: psycopg.Connection) -> None:
    db.execute(PLAIN_INSERT.format(s=schema))
    row = db.execute(
        f"SELECT headers, created_at IS NOT NULL, attempts, next_attempt_at, last_error,"
        f" first_attempt_at, last_attempt_at, published_at, convert_from(payload, 'UTF8') FROM {schema}.outbox"
    ).fetchone()
    assert row == ({}, True, 0, None, None, None, None, None, '{"id":1}')


def test_a_repeated_message_id_is_skipped_with_on_conflict(schema: str, db: psycopg.Connection) -> None:
    message_id = uuid.uuid4()
    insert = (
        f"INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)"
        " VALUES (%s, 'orders', 'order-1', convert_to('{}', 'UTF8'), '{\"source\": \"billing\"}'::jsonb)"
        " ON CONFLICT (message_id) DO NOTHING RETURNING id"
    )
    assert db.execute(insert, (message_id,)).fetchone() is not None
    assert db.execute(insert, (message_id,)).fetchone() is None
    assert db.execute(f"SELECT headers FROM {schema}.outbox").fetchall() == [({"source": "billing"},)]
    with pytest.raises(errors.UniqueViolation):
        db.execute(insert.replace(" ON CONFLICT (message_id) DO NOTHING", ""), (message_id,))


@pytest.mark.parametrize("headers", ['["a", "b"]', '"text"', "42", "null"])
def test_headers_must_be_a_json_object(schema: str, db: psycopg.Connection, headers: str) -> None:
    with pytest.raises((errors.CheckViolation, errors.NotNullViolation)):
        db.execute(
            f"INSERT INTO {schema}.outbox (topic, payload, headers) VALUES ('orders', '\\x00', %s::jsonb)",
            (headers,),
        )


def test_a_json_object_header_is_accepted(schema: str, db: psycopg.Connection) -> None:
    db.execute(
        f"INSERT INTO {schema}.outbox (topic, payload, headers) VALUES ('orders', '\\x00', %s::jsonb)",
        ('{"content-type": "application/json"}',),
    )
    assert db.execute(f"SELECT headers FROM {schema}.outbox").fetchone() == (
        {"content-type": "application/json"},
    )


@pytest.mark.parametrize("topic", ["", "x" * 250])
def test_an_empty_or_too_long_topic_is_rejected(schema: str, db: psycopg.Connection, topic: str) -> None:
    with pytest.raises(errors.CheckViolation):
        db.execute(f"INSERT INTO {schema}.outbox (topic, payload) VALUES (%s, '\\x00')", (topic,))


def test_a_topic_of_249_characters_is_accepted(schema: str, db: psycopg.Connection) -> None:
    db.execute(f"INSERT INTO {schema}.outbox (topic, payload) VALUES (%s, '\\x00')", ("x" * 249,))


@pytest.mark.parametrize("column", ["topic", "payload"])
def test_topic_and_payload_are_required(schema: str, db: psycopg.Connection, column: str) -> None:
    values = {"topic": "'orders'", "payload": "'\\x00'"}
    values[column] = "NULL"
    with pytest.raises(errors.NotNullViolation):
        db.execute(
            f"INSERT INTO {schema}.outbox (topic, payload) VALUES ({values['topic']}, {values['payload']})"
        )


@pytest.mark.parametrize("column", ["id", "partition"])
def test_generated_columns_cannot_be_set_by_writers(schema: str, db: psycopg.Connection, column: str) -> None:
    with pytest.raises(errors.GeneratedAlways):
        db.execute(f"INSERT INTO {schema}.outbox ({column}, topic, payload) VALUES (1, 'orders', '\\x00')")


def test_partition_count_is_recorded_and_used(database_url: str, db: psycopg.Connection) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    try:
        migrate.upgrade(settings, partitions=4)
        assert db.execute(
            f"SELECT value FROM {name}.relay_settings WHERE name = 'partitions'"
        ).fetchone() == ("4",)
        rows = db.execute(
            f"INSERT INTO {name}.outbox (topic, key, payload)"
            " SELECT 'orders', 'k' || g, '\\x00' FROM generate_series(1, 100) g RETURNING partition"
        ).fetchall()
        assert {row[0] for row in rows} == {0, 1, 2, 3}
    finally:
        db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, bool]:
    """Column -> nullable."""
    rows = conn.execute(
        "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        (schema, table),
    ).fetchall()
    return {name: nullable for name, nullable in rows}


def test_instance_health_is_an_additive_column_that_downgrades_away(
    database_url: str, db: psycopg.Connection
) -> None:
    """0003 only adds a nullable column: a relay of the previous release, whose heartbeat does not
    name it, keeps working on the new schema and counts as healthy (NULL)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    try:
        assert migrate.upgrade(settings, "0002") == "0002"
        before = _columns(db, name, "relay_instances")
        assert "unhealthy_reason" not in before

        assert migrate.upgrade(settings, "0003") == "0003"
        after = _columns(db, name, "relay_instances")
        assert after == {**before, "unhealthy_reason": True}
        # The previous release's heartbeat, verbatim in shape: it never names the new column.
        db.execute(
            f"INSERT INTO {name}.relay_instances (instance_id, hostname, pid, version, partitions)"
            " VALUES ('old-relay', 'h', 1, '0.9', '{1,2}')"
            " ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), partitions = excluded.partitions"
        )
        assert db.execute(f"SELECT unhealthy_reason FROM {name}.relay_instances").fetchall() == [(None,)]

        assert migrate.downgrade(settings, "0002") == "0002"
        assert _columns(db, name, "relay_instances") == before
        assert db.execute(f"SELECT instance_id FROM {name}.relay_instances").fetchall() == [("old-relay",)]
        assert migrate.upgrade(settings) == head_revision()
    finally:
        db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory(str(resources.files("relay") / "migrations"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def _apply_sql(database_url: str, sql: str) -> None:
    """The SQL in one session, stopping at the first error (tests/acceptance applies it with psql)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.encode())


def test_the_sql_of_every_upgrade_and_downgrade_builds_what_the_online_path_builds(
    database_url: str, db: psycopg.Connection
) -> None:
    """`migrate --sql` (applied here in one round trip; tests/acceptance applies it with psql) and
    `migrate` must not drift: for every revision, from base up to it and from head down to it."""
    online, offline = f"t_{uuid.uuid4().hex[:12]}", f"t_{uuid.uuid4().hex[:12]}"
    settings = {
        name: DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
        for name in (online, offline)
    }

    def reset(revision: str) -> None:
        for name in (online, offline):
            db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        migrate.upgrade(settings[online], revision, partitions=4)
        _apply_sql(database_url, migrate.offline_sql(settings[offline], revision, partitions=4))

    try:
        for revision in _revisions():
            reset(revision)
            assert schema_snapshot(db, offline) == schema_snapshot(db, online), f"upgrade to {revision}"
        for revision in ["base", *_revisions()[:-1]]:
            reset("head")
            migrate.downgrade(settings[online], revision)
            _apply_sql(database_url, migrate.offline_sql(settings[offline], revision, downgrade=True))
            assert schema_snapshot(db, offline) == schema_snapshot(db, online), f"downgrade to {revision}"
    finally:
        for name in (online, offline):
            db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_the_sql_of_a_migration_is_not_applied_twice(
    database_url: str, schema: str, db: psycopg.Connection
) -> None:
    """Each migration in the SQL checks the revision it starts from: applied to a schema already at
    head (as by a second session applying the same file), it stops before changing anything."""
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=schema)
    before = schema_snapshot(db, schema)
    with pytest.raises(
        errors.RaiseException,
        match=f"is at revision {head_revision()}, this migration starts from none",
    ):
        _apply_sql(database_url, migrate.offline_sql(settings))
    with pytest.raises(errors.RaiseException, match=f"this migration starts from {_revisions()[0]}"):
        _apply_sql(database_url, migrate.offline_sql(settings, f"{_revisions()[0]}:head"))
    assert schema_snapshot(db, schema) == before


def test_audit_identity_and_rate_buckets_are_additive_and_downgrade_away(
    database_url: str, db: psycopg.Connection
) -> None:
    """0004 adds a nullable column and a table: a control plane of the previous release, whose audit
    insert does not name the column, keeps working on the new schema (its rows: identity NULL)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(database_url=SecretStr(database_url), schema_name=name)
    try:
        assert migrate.upgrade(settings, "0003") == "0003"
        before = _columns(db, name, "audit_log")
        assert "client_identity" not in before and "rate_buckets" not in _relations(db, name)

        assert migrate.upgrade(settings, "0004") == "0004"
        assert _columns(db, name, "audit_log") == {**before, "client_identity": True}
        assert _relations(db, name)["rate_buckets"] == "r"
        # The previous release's audit insert, verbatim in shape.
        db.execute(
            f"INSERT INTO {name}.audit_log (actor, action, arguments, result)"
            " VALUES ('admin', 'Pause', '{}'::jsonb, '{}'::jsonb)"
        )
        assert db.execute(f"SELECT client_identity FROM {name}.audit_log").fetchall() == [(None,)]

        assert migrate.downgrade(settings, "0003") == "0003"
        assert _columns(db, name, "audit_log") == before
        assert "rate_buckets" not in _relations(db, name)
        assert migrate.upgrade(settings) == head_revision()
    finally:
        db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
