"""A database-level API for every language: stored functions to publish events, take leases, and run
the relay's own steps, so that a service in any language (or psql) needs no client library.

Additive: new functions only, no table changes; an older relay or control plane ignores them. Every
function is SECURITY INVOKER (the caller's own table privileges apply: docs/grants.sql grants EXECUTE
per role); docs/sql-api.md documents them. The bodies of the relay-step and lease functions are
the very statements the relay and the control plane run (relay/sql/queries.sql,
control/queries.sql), frozen here as of this revision; tests/integration/test_sql_api.py checks that
they still are. A later change to one of those statements needs a migration that redefines its
function.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op

from relay.migrations.context import schema

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Validation errors raise SQLSTATE 22023 (invalid_parameter_value); a message_id written again with
# other content raises OBX01 (the Python writer's OutboxConflictError).
CONFLICT_SQLSTATE = "OBX01"

SIGNATURES = (
    "_publish_outbox(text, text, bytea, jsonb, uuid, integer, boolean)",
    "publish_outbox(text, text, bytea, jsonb, uuid, integer)",
    "publish_outbox(text, text, text, jsonb, uuid, integer)",
    "publish_outbox(text, text, jsonb, jsonb, uuid, integer)",
    "acquire_lock(text, text, double precision)",
    "extend_locks(text[], bigint[], text, double precision)",
    "extend_lock(text, text, bigint, double precision)",
    "release_locks(text[], bigint[], text)",
    "release_lock(text, text, bigint)",
    "cleanup_expired_locks()",
    "claim_outbox_events(integer, text, text, bigint, integer, text[], bigint, text[])",
    "complete_outbox_event(bigint[], text, text, bigint, boolean)",
    "record_outbox_failure(bigint[], text, text, bigint, double precision[], text[])",
    "archive_dead_letter(bigint[], text, text, bigint, text[], text[])",
    "record_replay(text, text, text, timestamptz, timestamptz, text, bigint[], bigint, bigint, integer,"
    " boolean, text)",
)


def upgrade() -> None:
    s = schema()
    _publish(s)
    _leases(s)
    _relay_steps(s)
    _replay(s)


def downgrade() -> None:
    s = schema()
    for signature in reversed(SIGNATURES):
        op.execute(f"DROP FUNCTION IF EXISTS {s}.{signature}")


def _publish(s: str) -> None:
    # The Python writer's rules (clients/writer.py), checked by the database: the same limits, the
    # same idempotency (same content: the same message_id back, nothing written; other content: an
    # error), the same row.
    op.execute(f"""
CREATE FUNCTION {s}._publish_outbox(
    p_topic text, p_key text, p_payload bytea, p_headers jsonb, p_message_id uuid,
    p_max_event_bytes integer, p_json boolean
) RETURNS uuid LANGUAGE plpgsql SECURITY INVOKER AS $fn$
DECLARE
    mid uuid := coalesce(p_message_id, gen_random_uuid());
    hdrs jsonb := coalesce(p_headers, '{{}}'::jsonb);
    header record;
    key_bytes integer := coalesce(octet_length(p_key), 0);
    header_bytes integer := 0;
    differences text[];
BEGIN
    IF p_topic IS NULL OR btrim(p_topic, E' \\t\\n\\r\\f\\v') = '' THEN
        RAISE EXCEPTION 'topic must not be empty or blank' USING ERRCODE = '22023';
    END IF;
    IF length(p_topic) > 249 THEN
        RAISE EXCEPTION 'topic is % characters long; the limit is 249', length(p_topic) USING ERRCODE = '22023';
    END IF;
    IF key_bytes > 1024 THEN
        RAISE EXCEPTION 'key is % bytes in UTF-8; the limit is 1024', key_bytes USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload is NULL: pass an empty value for an empty payload' USING ERRCODE = '22023';
    END IF;
    IF p_max_event_bytes IS NULL OR p_max_event_bytes < 1 THEN
        RAISE EXCEPTION 'max_event_bytes must be a positive integer, got %', coalesce(p_max_event_bytes::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(hdrs) <> 'object' THEN
        RAISE EXCEPTION 'headers must be a JSON object of strings, got a JSON %', jsonb_typeof(hdrs)
            USING ERRCODE = '22023';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(hdrs)) > 64 THEN
        RAISE EXCEPTION 'headers has % entries; the limit is 64', (SELECT count(*) FROM jsonb_object_keys(hdrs))
            USING ERRCODE = '22023';
    END IF;
    FOR header IN SELECT e.key AS name, e.value FROM jsonb_each(hdrs) e LOOP
        IF jsonb_typeof(header.value) <> 'string' THEN
            RAISE EXCEPTION 'header % has a JSON % value; header values must be strings',
                to_json(header.name)::text, jsonb_typeof(header.value) USING ERRCODE = '22023';
        END IF;
        IF octet_length(header.name) > 256 THEN
            RAISE EXCEPTION 'header name %... is % bytes in UTF-8; the limit is 256',
                to_json(left(header.name, 40))::text, octet_length(header.name) USING ERRCODE = '22023';
        END IF;
    END LOOP;
    IF p_json AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(hdrs) k WHERE lower(k) = 'content-type') THEN
        hdrs := hdrs || '{{"content-type": "application/json"}}'::jsonb;
    END IF;
    SELECT coalesce(sum(octet_length(e.key) + octet_length(e.value #>> '{{}}')), 0) INTO header_bytes
    FROM jsonb_each(hdrs) e;
    IF header_bytes > 16384 THEN
        RAISE EXCEPTION 'headers are % bytes (names and values); the limit is 16384', header_bytes
            USING ERRCODE = '22023';
    END IF;
    IF octet_length(p_payload) + key_bytes + header_bytes > p_max_event_bytes THEN
        RAISE EXCEPTION 'event is % bytes (payload % + key % + headers %); the limit (max_event_bytes) is %',
            octet_length(p_payload) + key_bytes + header_bytes, octet_length(p_payload), key_bytes,
            header_bytes, p_max_event_bytes USING ERRCODE = '22023';
    END IF;

    INSERT INTO {s}.outbox (message_id, topic, key, payload, headers)
    VALUES (mid, p_topic, p_key, p_payload, hdrs)
    ON CONFLICT (message_id) DO NOTHING;
    IF FOUND THEN
        RETURN mid;
    END IF;
    -- Already there (this statement sees a row a concurrent transaction committed meanwhile): the
    -- same event is an idempotent retry, other content under the same message_id is an error.
    -- Trace context differs between attempts and is not compared, as in the Python writer.
    SELECT array_remove(ARRAY[
        CASE WHEN o.topic <> p_topic THEN 'topic' END,
        CASE WHEN o.key IS DISTINCT FROM p_key THEN 'key' END,
        CASE WHEN o.payload <> p_payload THEN 'payload' END,
        CASE WHEN o.headers - ARRAY['traceparent', 'tracestate'] <> hdrs - ARRAY['traceparent', 'tracestate']
             THEN 'headers' END
    ], NULL) INTO differences
    FROM {s}.outbox o WHERE o.message_id = mid;
    IF differences <> '{{}}' THEN
        RAISE EXCEPTION 'message_id % is already in the outbox with a different %', mid,
            array_to_string(differences, ' and ')
            USING ERRCODE = '{CONFLICT_SQLSTATE}',
                  HINT = 'Reuse a message_id only to retry the same event.',
                  DETAIL = 'Differing fields: ' || array_to_string(differences, ', ');
    END IF;
    RETURN mid;
END
$fn$""")
    for payload_type, payload, is_json in (
        ("bytea", "payload", "false"),
        ("text", "convert_to(payload, 'UTF8')", "false"),
        ("jsonb", "convert_to(payload::text, 'UTF8')", "true"),
    ):
        op.execute(f"""
CREATE FUNCTION {s}.publish_outbox(
    topic text, key text, payload {payload_type}, headers jsonb DEFAULT '{{}}', message_id uuid DEFAULT NULL,
    max_event_bytes integer DEFAULT 1000000
) RETURNS uuid LANGUAGE sql SECURITY INVOKER AS $fn$
SELECT {s}._publish_outbox($1, $2, {payload.replace("payload", "$3")}, $4, $5, $6, {is_json})
$fn$""")


def _leases(s: str) -> None:
    # lease_acquire, lease_renew and lease_release of relay/sql/queries.sql, word for word.
    op.execute(f"""
CREATE FUNCTION {s}.acquire_lock(name text, holder text, ttl_seconds double precision)
RETURNS bigint LANGUAGE sql SECURITY INVOKER AS $fn$
INSERT INTO {s}.distributed_locks AS l (name, holder, token, acquired_at, renewed_at, expires_at)
VALUES ($1, $2, 1, now(), now(), now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder, token = l.token + 1, acquired_at = now(), renewed_at = now(),
    expires_at = excluded.expires_at
WHERE l.holder IS NULL OR l.expires_at <= now()
RETURNING l.token;
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.extend_locks(names text[], tokens bigint[], holder text, ttl_seconds double precision)
RETURNS SETOF text LANGUAGE sql SECURITY INVOKER AS $fn$
UPDATE {s}.distributed_locks l
SET expires_at = now() + make_interval(secs => $4), renewed_at = now()
FROM unnest($1::text[], $2::bigint[]) AS h(name, token)
WHERE l.name = h.name AND l.token = h.token AND l.holder = $3 AND l.expires_at > now()
RETURNING l.name;
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.extend_lock(name text, holder text, token bigint, ttl_seconds double precision)
RETURNS boolean LANGUAGE sql SECURITY INVOKER AS $fn$
SELECT count(*) > 0 FROM {s}.extend_locks(ARRAY[$1], ARRAY[$3], $2, $4);
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.release_locks(names text[], tokens bigint[], holder text)
RETURNS integer LANGUAGE plpgsql SECURITY INVOKER AS $fn$
#variable_conflict use_column
DECLARE
    released integer;
BEGIN
UPDATE {s}.distributed_locks l
SET holder = NULL, expires_at = now()
FROM unnest($1::text[], $2::bigint[]) AS h(name, token)
WHERE l.name = h.name AND l.token = h.token AND l.holder = $3;
    GET DIAGNOSTICS released = ROW_COUNT;
    RETURN released;
END
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.release_lock(name text, holder text, token bigint)
RETURNS boolean LANGUAGE sql SECURITY INVOKER AS $fn$
SELECT {s}.release_locks(ARRAY[$1], ARRAY[$3], $2) > 0;
$fn$""")
    # Expired leases lose their holder; the rows stay, so that the fencing token of a name keeps
    # growing (deleting a row would restart it at 1 and let an old token pass a fence again).
    op.execute(f"""
CREATE FUNCTION {s}.cleanup_expired_locks()
RETURNS integer LANGUAGE plpgsql SECURITY INVOKER AS $fn$
DECLARE
    cleaned integer;
BEGIN
    UPDATE {s}.distributed_locks SET holder = NULL WHERE holder IS NOT NULL AND expires_at <= now();
    GET DIAGNOSTICS cleaned = ROW_COUNT;
    RETURN cleaned;
END
$fn$""")


def _relay_steps(s: str) -> None:
    # claim_batch, settle_delete / settle_retain, record_failures and dead_letter of
    # relay/sql/queries.sql, word for word, fence ({{fragment:lease_fence}}) inlined.
    fence = f"""EXISTS (
          SELECT 1 FROM {s}.distributed_locks l
          WHERE l.name = $2 AND l.name = 'partition:' || o.partition
            AND l.holder = $3 AND l.token = $4 AND l.expires_at > now())"""
    op.execute(f"""
CREATE FUNCTION {s}.claim_outbox_events(
    partition integer, lease_name text, holder text, token bigint, max_rows integer,
    paused_topics text[] DEFAULT '{{}}', max_bytes bigint DEFAULT 9223372036854775807,
    skipped_topics text[] DEFAULT '{{}}'
) RETURNS TABLE (
    id bigint, message_id uuid, topic text, key text, payload bytea, headers text,
    created_at timestamptz, attempts integer, first_attempt_at timestamptz
) LANGUAGE sql SECURITY INVOKER AS $fn$
WITH blocked AS (
    SELECT topic, key, min(id) AS first_id
    FROM {s}.outbox
    WHERE partition = $1 AND published_at IS NULL AND next_attempt_at > now() AND key IS NOT NULL
    GROUP BY topic, key
),
candidates AS MATERIALIZED (
    SELECT o.id,
           octet_length(o.payload)::bigint + coalesce(octet_length(o.key), 0)
               + octet_length(o.headers::text) AS size
    FROM {s}.outbox o
    WHERE o.partition = $1
      AND o.published_at IS NULL
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
      AND NOT (o.topic LIKE ANY ($6::text[]))
      AND o.topic <> ALL ($8::text[])
      AND NOT EXISTS (
          SELECT 1 FROM blocked b WHERE b.topic = o.topic AND b.key = o.key AND b.first_id < o.id)
      AND {fence}
    ORDER BY o.id
    LIMIT $5
    FOR UPDATE OF o SKIP LOCKED
),
sized AS (
    SELECT id,
           row_number() OVER w AS n,
           sum(size) OVER (w ROWS UNBOUNDED PRECEDING) AS running
    FROM candidates
    WINDOW w AS (ORDER BY id)
)
SELECT o.id, o.message_id, o.topic, o.key, o.payload, o.headers::text AS headers,
       o.created_at, o.attempts, o.first_attempt_at
FROM sized s
JOIN {s}.outbox o ON o.id = s.id
WHERE s.n = 1 OR s.running <= $7::bigint
ORDER BY o.id;
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.complete_outbox_event(
    ids bigint[], lease_name text, holder text, token bigint, retain boolean DEFAULT false
) RETURNS integer LANGUAGE plpgsql SECURITY INVOKER AS $fn$
#variable_conflict use_column
DECLARE
    settled integer;
BEGIN
    IF $5 THEN
UPDATE {s}.outbox o
SET published_at = now()
WHERE o.id = ANY ($1::bigint[])
  AND {fence};
    ELSE
DELETE FROM {s}.outbox o
WHERE o.id = ANY ($1::bigint[])
  AND {fence};
    END IF;
    GET DIAGNOSTICS settled = ROW_COUNT;
    RETURN settled;
END
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.record_outbox_failure(
    ids bigint[], lease_name text, holder text, token bigint, delays double precision[], errors text[]
) RETURNS integer LANGUAGE plpgsql SECURITY INVOKER AS $fn$
#variable_conflict use_column
DECLARE
    recorded integer;
BEGIN
UPDATE {s}.outbox o
SET attempts = o.attempts + 1,
    next_attempt_at = now() + make_interval(secs => f.delay),
    last_error = f.error,
    first_attempt_at = coalesce(o.first_attempt_at, now()),
    last_attempt_at = now()
FROM unnest($1::bigint[], $5::float8[], $6::text[]) AS f(id, delay, error)
WHERE o.id = f.id
  AND {fence};
    GET DIAGNOSTICS recorded = ROW_COUNT;
    RETURN recorded;
END
$fn$""")
    op.execute(f"""
CREATE FUNCTION {s}.archive_dead_letter(
    ids bigint[], lease_name text, holder text, token bigint, reasons text[], errors text[]
) RETURNS TABLE (id bigint, outbox_id bigint, reason text) LANGUAGE sql SECURITY INVOKER AS $fn$
WITH moved AS (
    DELETE FROM {s}.outbox o
    USING unnest($1::bigint[], $5::text[], $6::text[]) AS f(id, reason, error)
    WHERE o.id = f.id
      AND {fence}
    RETURNING o.*, f.reason, f.error
)
INSERT INTO {s}.dead_letter_archive
    (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
     first_attempt_at, last_attempt_at, archived_by)
SELECT id, message_id, topic, key, payload, headers, created_at, attempts + 1, reason, error,
       coalesce(first_attempt_at, now()), now(), $3
FROM moved
RETURNING id, outbox_id, reason;
$fn$""")


def _replay(s: str) -> None:
    # control_replay_chunk of control/queries.sql, word for word ({{fragment:dead_letter_filter}} inlined).
    op.execute(f"""
CREATE FUNCTION {s}.record_replay(
    topic text, key text, reason text, archived_after timestamptz, archived_before timestamptz,
    request_id text, dead_letter_ids bigint[], after_id bigint, up_to_id bigint, max_rows integer,
    force boolean, actor text
) RETURNS TABLE (dead_letter_id bigint, replayed boolean) LANGUAGE sql SECURITY INVOKER AS $fn$
WITH picked AS (
    SELECT d.id, d.message_id, d.topic, d.key, d.payload, d.headers
    FROM {s}.dead_letter_archive d
    WHERE d.id > $8 AND d.id <= $9
      AND ($7::bigint[] IS NULL OR d.id = ANY ($7::bigint[]))
      AND ($1::text IS NULL OR d.topic = $1)
      AND ($2::text IS NULL OR d.key = $2)
      AND ($3::text IS NULL OR d.reason = $3)
      AND ($4::timestamptz IS NULL OR d.archived_at >= $4)
      AND ($5::timestamptz IS NULL OR d.archived_at < $5)
    ORDER BY d.id
    LIMIT $10
),
mine AS (
    SELECT DISTINCT r.dead_letter_id AS id
    FROM {s}.replay_log r
    WHERE r.request_id = $6::text AND r.dead_letter_id IN (SELECT id FROM picked)
),
logged AS (
    INSERT INTO {s}.replay_log
        (dead_letter_id, request_id, original_message_id, new_message_id, forced, replayed_by)
    SELECT p.id, $6::text, p.message_id, gen_random_uuid(), $11::boolean, $12::text
    FROM picked p
    WHERE p.id NOT IN (SELECT id FROM mine)
    ORDER BY p.id
    ON CONFLICT (dead_letter_id) WHERE NOT forced DO NOTHING
    RETURNING dead_letter_id, new_message_id
),
inserted AS (
    INSERT INTO {s}.outbox (message_id, topic, key, payload, headers)
    SELECT l.new_message_id, p.topic, p.key, p.payload,
           p.headers || jsonb_build_object('x-replayed-from', p.message_id::text, 'x-replay-request', $6::text)
    FROM logged l JOIN picked p ON p.id = l.dead_letter_id
    ORDER BY p.id
    RETURNING 1
)
SELECT p.id, (l.dead_letter_id IS NOT NULL OR p.id IN (SELECT id FROM mine)) AS replayed
FROM picked p LEFT JOIN logged l ON l.dead_letter_id = p.id
ORDER BY p.id;
$fn$""")
