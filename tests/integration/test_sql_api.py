"""The database-level API (migration 0005, docs/sql-api.md): stored functions that publish events,
take leases and run the relay's own steps, for services in any language.

- The relay-step and lease functions run the very statements the relay and the control plane run:
  their bodies, read back from the migrated schema, contain the named SQL blocks word for word.
- publish_outbox writes the row the Python writer writes, with the same rules and idempotency.
- Every function works from plain SQL through psql (tests/acceptance/test_sql_api_psql.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from clients import enqueue
from relay.shared.sqlblocks import bind_schema, load_blocks

CONFLICT_SQLSTATE = "OBX01"
INVALID = "22023"

# function -> the named blocks its body runs, word for word (after {schema} is bound).
RELAY_STATEMENTS = {
    "acquire_lock": ["lease_acquire"],
    "extend_locks": ["lease_renew"],
    "release_locks": ["lease_release"],
    "claim_outbox_events": ["claim_batch"],
    "complete_outbox_event": ["settle_delete", "settle_retain"],
    "record_outbox_failure": ["record_failures"],
    "archive_dead_letter": ["dead_letter"],
}
CONTROL_STATEMENTS = {"record_replay": ["control_replay_chunk"]}


def normalized(sql: str) -> str:
    """SQL without comments, with runs of whitespace as one space and no trailing semicolon."""
    without_comments = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"\s+", " ", without_comments).strip().rstrip(";").strip()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def _sources(conn: psycopg.Connection, schema: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, source in conn.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s",
        (schema,),
    ).fetchall():
        found.setdefault(name, []).append(source)
    return found


@pytest.mark.parametrize(
    ("package", "statements"), [("relay.sql", RELAY_STATEMENTS), ("control", CONTROL_STATEMENTS)]
)
def test_the_functions_run_the_very_statements_of_the_relay(
    schema: str, db: psycopg.Connection, package: str, statements: dict[str, list[str]]
) -> None:
    blocks = bind_schema(load_blocks(package, "queries.sql"), schema)
    sources = _sources(db, schema)
    for function, names in statements.items():
        (source,) = sources[function]
        for name in names:
            assert normalized(blocks[name]) in normalized(source), (
                f"{function}() no longer runs block {name} of {package}/queries.sql word for word: a change "
                "to that statement needs a migration that redefines the function (see migration 0005)"
            )


def _row(db: psycopg.Connection, schema: str, message_id: uuid.UUID) -> dict[str, object]:
    cur = db.execute(f'SELECT * FROM "{schema}".outbox WHERE message_id = %s', (message_id,), prepare=False)
    assert cur.description is not None
    columns = [c.name for c in cur.description]
    row = cur.fetchone()
    assert row is not None
    return {
        c: v
        for c, v in zip(columns, row, strict=True)
        if c not in ("id", "message_id", "created_at", "partition")
    }


@pytest.mark.parametrize(
    ("payload", "sql_payload", "key", "headers"),
    [
        (b"\x00\x01binary", "%s::bytea", "order-1", {"a": "1", "b": "zwei"}),
        ("text é ✓", "%s::text", None, {}),
        ("", "%s::text", "k", {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
    ],
)
def test_publish_outbox_writes_the_row_the_python_writer_writes(
    schema: str,
    db: psycopg.Connection,
    payload: object,
    sql_payload: str,
    key: str | None,
    headers: dict[str, str],
) -> None:
    import json

    python_id = uuid.uuid4()
    with db.transaction():
        enqueue(db, "orders.paid", payload, key=key, headers=headers, message_id=python_id, schema=schema)
    sql_payload_value = payload.encode() if isinstance(payload, str) and "bytea" in sql_payload else payload
    (sql_id,) = db.execute(
        f'SELECT "{schema}".publish_outbox(%s, %s, {sql_payload}, %s::jsonb)',
        ("orders.paid", key, sql_payload_value, json.dumps(headers)),
    ).fetchone() or (None,)
    assert isinstance(sql_id, uuid.UUID)
    python_row, sql_row = _row(db, schema, python_id), _row(db, schema, sql_id)
    assert python_row == sql_row
    # The partition follows the key (or, keyless, the message_id), as for every writer.
    if key is not None:
        partitions = db.execute(
            f'SELECT DISTINCT partition FROM "{schema}".outbox WHERE message_id IN (%s, %s)',
            (python_id, sql_id),
        ).fetchall()
        assert len(partitions) == 1


def test_publish_outbox_is_idempotent_on_message_id_and_rejects_other_content(
    schema: str, db: psycopg.Connection
) -> None:
    mid = uuid.uuid4()
    call = f'SELECT "{schema}".publish_outbox(%s, %s, %s::bytea, %s::jsonb, %s)'
    assert db.execute(call, ("t", "k", b"x", '{"h": "1"}', mid)).fetchone() == (mid,)
    # The same event again (trace context aside): the same id, nothing written.
    assert db.execute(call, ("t", "k", b"x", '{"h": "1", "traceparent": "x"}', mid)).fetchone() == (mid,)
    assert db.execute(f'SELECT count(*) FROM "{schema}".outbox').fetchone() == (1,)
    # A Python retry of the same event is idempotent against it too.
    with db.transaction():
        assert not enqueue(db, "t", b"x", key="k", headers={"h": "1"}, message_id=mid, schema=schema).inserted
    with pytest.raises(psycopg.Error) as caught:
        db.execute(call, ("t", "k", b"y", '{"h": "2"}', mid))
    assert caught.value.sqlstate == CONFLICT_SQLSTATE
    assert f"message_id {mid} is already in the outbox with a different payload and headers" in str(
        caught.value
    )
    assert db.execute(f'SELECT count(*) FROM "{schema}".outbox').fetchone() == (1,)


def test_publish_outbox_jsonb_adds_a_json_content_type(schema: str, db: psycopg.Connection) -> None:
    (mid,) = (
        db.execute(f'SELECT "{schema}".publish_outbox(%s, NULL, %s::jsonb)', ("t", '{"id": 1}')).fetchone()
        or ()
    )
    payload, headers = (
        db.execute(
            f"SELECT convert_from(payload, 'UTF8'), headers FROM \"{schema}\".outbox WHERE message_id = %s",
            (mid,),
        ).fetchone()
        or ()
    )
    assert payload == '{"id": 1}'
    assert headers == {"content-type": "application/json"}
    (mid,) = (
        db.execute(
            f'SELECT "{schema}".publish_outbox(%s, NULL, %s::jsonb, %s::jsonb)',
            ("t", "[1]", '{"Content-Type": "x"}'),
        ).fetchone()
        or ()
    )
    assert db.execute(f'SELECT headers FROM "{schema}".outbox WHERE message_id = %s', (mid,)).fetchone() == (
        {"Content-Type": "x"},
    )


@pytest.mark.parametrize(
    ("topic", "key", "payload", "headers", "message"),
    [
        ("", None, b"x", "{}", "topic must not be empty or blank"),
        ("  ", None, b"x", "{}", "topic must not be empty or blank"),
        ("t" * 250, None, b"x", "{}", "topic is 250 characters long; the limit is 249"),
        ("t", "k" * 1025, b"x", "{}", "key is 1025 bytes in UTF-8; the limit is 1024"),
        ("t", None, None, "{}", "payload is NULL"),
        ("t", None, b"x", "[]", "headers must be a JSON object of strings, got a JSON array"),
        ("t", None, b"x", '{"n": 1}', 'header "n" has a JSON number value; header values must be strings'),
        ("t", None, b"x", '{"%s": "v"}' % ("h" * 257), "is 257 bytes in UTF-8; the limit is 256"),
        ("t", None, b"x", "{" + ",".join(f'"h{i}": "v"' for i in range(65)) + "}", "headers has 65 entries"),
        ("t", None, b"x", '{"h": "%s"}' % ("v" * 16_384), "headers are 16385 bytes (names and values)"),
        (
            "t",
            "k",
            b"x" * 999_999,
            '{"h": "v"}',
            "event is 1000002 bytes (payload 999999 + key 1 + headers 2)",
        ),
    ],
)
def test_publish_outbox_validates_like_the_python_writer(
    schema: str,
    db: psycopg.Connection,
    topic: str,
    key: str | None,
    payload: bytes | None,
    headers: str,
    message: str,
) -> None:
    with pytest.raises(psycopg.Error) as caught:
        db.execute(
            f'SELECT "{schema}".publish_outbox(%s, %s, %s::bytea, %s::jsonb)', (topic, key, payload, headers)
        )
    assert caught.value.sqlstate == INVALID
    assert message in str(caught.value)
    assert db.execute(f'SELECT count(*) FROM "{schema}".outbox').fetchone() == (0,)


def test_leases_fence_and_change_hands(schema: str, db: psycopg.Connection) -> None:
    s = f'"{schema}"'
    (token,) = db.execute(f"SELECT {s}.acquire_lock('job:a', 'me', 30)").fetchone() or ()
    assert token == 1
    assert db.execute(f"SELECT {s}.acquire_lock('job:a', 'you', 30)").fetchone() == (None,)
    assert db.execute(f"SELECT {s}.extend_lock('job:a', 'me', 1, 30)").fetchone() == (True,)
    assert db.execute(f"SELECT {s}.extend_lock('job:a', 'you', 1, 30)").fetchone() == (False,)
    assert db.execute(f"SELECT {s}.extend_lock('job:a', 'me', 2, 30)").fetchone() == (False,)
    assert db.execute(f"SELECT {s}.release_lock('job:a', 'you', 1)").fetchone() == (False,)
    assert db.execute(f"SELECT {s}.release_lock('job:a', 'me', 1)").fetchone() == (True,)
    assert db.execute(f"SELECT {s}.release_lock('job:a', 'me', 1)").fetchone() == (False,)
    assert db.execute(f"SELECT {s}.acquire_lock('job:a', 'you', 0)").fetchone() == (2,)  # expires at once
    assert db.execute(f"SELECT {s}.extend_lock('job:a', 'you', 2, 30)").fetchone() == (False,)
    assert db.execute(f"SELECT {s}.cleanup_expired_locks()").fetchone() == (1,)
    assert db.execute(f"SELECT holder, token FROM {s}.distributed_locks WHERE name = 'job:a'").fetchone() == (
        None,
        2,
    )
    assert db.execute(f"SELECT {s}.acquire_lock('job:a', 'me', 30)").fetchone() == (3,)


def test_the_relay_steps_claim_settle_fail_and_archive_under_the_fence(
    schema: str, db: psycopg.Connection
) -> None:
    s = f'"{schema}"'
    ids = []
    for n in range(4):
        db.execute(f"SELECT {s}.publish_outbox('t', 'k', %s::bytea)", (f"e{n}".encode(),))
    (partition,) = db.execute(f"SELECT DISTINCT partition FROM {s}.outbox").fetchone() or ()
    lease = f"partition:{partition}"
    (token,) = db.execute(f"SELECT {s}.acquire_lock(%s, 'relay-1', 30)", (lease,)).fetchone() or ()
    # Without the lease (another holder, or a stale token) nothing is claimed.
    assert (
        db.execute(
            f"SELECT * FROM {s}.claim_outbox_events(%s, %s, 'other', %s, 10)", (partition, lease, token)
        ).fetchall()
        == []
    )
    rows = db.execute(
        f"SELECT id, payload FROM {s}.claim_outbox_events(%s, %s, 'relay-1', %s, 10)",
        (partition, lease, token),
    ).fetchall()
    ids = [row[0] for row in rows]
    assert [bytes(row[1]) for row in rows] == [b"e0", b"e1", b"e2", b"e3"]
    fence = (lease, "relay-1", token)
    assert db.execute(f"SELECT {s}.complete_outbox_event(%s, %s, %s, %s)", ([ids[0]], *fence)).fetchone() == (
        1,
    )
    assert db.execute(
        f"SELECT {s}.complete_outbox_event(%s, %s, %s, %s, true)", ([ids[1]], *fence)
    ).fetchone() == (1,)
    assert db.execute(
        f"SELECT {s}.complete_outbox_event(%s, %s, 'other', %s)", ([ids[2]], lease, token)
    ).fetchone() == (0,)
    assert db.execute(
        f"SELECT {s}.record_outbox_failure(%s, %s, %s, %s, %s, %s)", ([ids[2]], *fence, [60.0], ["boom"])
    ).fetchone() == (1,)
    archived = db.execute(
        f"SELECT outbox_id, reason FROM {s}.archive_dead_letter(%s, %s, %s, %s, %s, %s)",
        ([ids[3]], *fence, ["rejected"], ["too big"]),
    ).fetchall()
    assert archived == [(ids[3], "rejected")]
    state = db.execute(
        f"SELECT id, published_at IS NOT NULL, attempts, last_error FROM {s}.outbox ORDER BY id"
    ).fetchall()
    assert state == [(ids[1], True, 0, None), (ids[2], False, 1, "boom")]
    (dead_letter_id, archived_by) = (
        db.execute(f"SELECT id, archived_by FROM {s}.dead_letter_archive").fetchone() or ()
    )
    assert archived_by == "relay-1"
    # Replay: once per dead letter unless forced; the request id makes a retry idempotent.
    replay = f"SELECT * FROM {s}.record_replay(NULL, NULL, NULL, NULL, NULL, %s, NULL, 0, %s, 100, %s, 'ops')"
    assert db.execute(replay, ("r1", dead_letter_id, False)).fetchall() == [(dead_letter_id, True)]
    assert db.execute(replay, ("r1", dead_letter_id, False)).fetchall() == [(dead_letter_id, True)]
    assert db.execute(replay, ("r2", dead_letter_id, False)).fetchall() == [(dead_letter_id, False)]
    assert db.execute(f"SELECT count(*) FROM {s}.replay_log").fetchone() == (1,)
    assert db.execute(f"SELECT count(*) FROM {s}.outbox WHERE headers ? 'x-replayed-from'").fetchone() == (1,)
