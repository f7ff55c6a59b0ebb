-- Every statement of the gRPC control plane (control/store.py), in one place.
-- Blocks are named by a "-- name --" line. {schema} is replaced by the quoted schema name.
-- {fragment:name} inlines block `name` (its leading comments dropped, its lines indented as far as
-- the placeholder's line): a clause written once and used by several statements (relay.shared.sqlblocks).
-- jsonb crosses the wire as text (::text / $n::text::jsonb) so that no pool codec changes its meaning.
-- Every statement that selects dead letters by filter uses {fragment:dead_letter_filter}, with the
-- filter in $1..$5 (topic, key, reason, archived_after, archived_before; NULL means "any") and the
-- archive row as `d`.

-- dead_letter_filter --
-- A fragment, never run on its own: the dead-letter filter of List, Replay and Purge, in $1..$5.
($1::text IS NULL OR d.topic = $1)
AND ($2::text IS NULL OR d.key = $2)
AND ($3::text IS NULL OR d.reason = $3)
AND ($4::timestamptz IS NULL OR d.archived_at >= $4)
AND ($5::timestamptz IS NULL OR d.archived_at < $5)

-- control_now --
SELECT now();

-- control_status_instances --
-- Instances that heartbeated within $1 seconds and did not stop.
SELECT i.instance_id, i.hostname, i.pid, i.version, i.started_at, i.heartbeat_at, i.partitions,
       EXISTS (
           SELECT 1 FROM {schema}.distributed_locks l
           WHERE l.name = 'leader' AND l.holder = i.instance_id AND l.expires_at > now()) AS leader
FROM {schema}.relay_instances i
WHERE i.stopped_at IS NULL AND i.heartbeat_at > now() - make_interval(secs => $1::float8)
ORDER BY i.instance_id;

-- control_status_backlog --
-- Unpublished events per topic, reading at most $1 of them in all (OUTBOX_CONTROL_COUNT_LIMIT), so
-- that a backlog of millions costs no more than that: exact while the backlog is smaller; beyond it
-- each topic's figures cover only the rows read (its count is then a lower bound).
SELECT topic, count(*)::bigint AS pending, min(created_at) AS oldest_created_at
FROM (
    SELECT topic, created_at
    FROM {schema}.outbox
    WHERE published_at IS NULL
    LIMIT $1
) AS pending
GROUP BY topic
ORDER BY topic;

-- control_status_dead_letters --
-- Counts at most $1 rows: exact below, $1 (meaning "at least $1") beyond.
SELECT count(*)::bigint FROM (SELECT 1 FROM {schema}.dead_letter_archive LIMIT $1) AS archived;

-- control_schema_version --
SELECT version_num FROM {schema}.alembic_version;

-- control_locks --
SELECT name, holder, token, acquired_at, renewed_at, expires_at, expires_at <= now() AS expired
FROM {schema}.distributed_locks
ORDER BY name ~ '^partition:[0-9]+$',
         CASE WHEN name ~ '^partition:[0-9]+$' THEN split_part(name, ':', 2)::int END,
         name COLLATE "C";

-- control_lock_for_update --
SELECT name, holder, token, acquired_at, renewed_at, expires_at, expires_at <= now() AS expired
FROM {schema}.distributed_locks
WHERE name = $1
FOR UPDATE;

-- control_lock_release --
-- Frees the lease only if it is still held as the caller expects; the next acquire bumps the token,
-- so the previous holder's fenced writes fail from now on.
UPDATE {schema}.distributed_locks
SET holder = NULL, expires_at = now()
WHERE name = $1
  AND ($2::text IS NULL OR holder = $2)
  AND ($3::bigint IS NULL OR token = $3)
RETURNING name, holder, token, acquired_at, renewed_at, expires_at, expires_at <= now() AS expired;

-- control_pauses --
SELECT id, topic_pattern, reason, paused_by, created_at, expires_at
FROM {schema}.pauses
WHERE $1::boolean OR expires_at IS NULL OR expires_at > now()
ORDER BY topic_pattern COLLATE "C";

-- control_pause_upsert --
-- $4: absolute expiry, $5: seconds from now; at most one is set, neither means "until resumed".
INSERT INTO {schema}.pauses AS p (topic_pattern, reason, paused_by, expires_at)
VALUES ($1, $2, $3, coalesce($4::timestamptz, now() + make_interval(secs => $5::float8)))
ON CONFLICT (topic_pattern) DO UPDATE
SET reason = excluded.reason, paused_by = excluded.paused_by, created_at = now(),
    expires_at = excluded.expires_at
RETURNING id, topic_pattern, reason, paused_by, created_at, expires_at;

-- control_pause_delete --
DELETE FROM {schema}.pauses
WHERE topic_pattern = $1
RETURNING id, topic_pattern, reason, paused_by, created_at, expires_at;

-- control_audit_insert --
-- $5: the verified client identity (control.auth.client_identity), beside the declared actor.
INSERT INTO {schema}.audit_log (actor, action, arguments, result, client_identity)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5)
RETURNING id;

-- control_audit_update --
-- The outcome so far of a long call (replay, purge) that wrote its audit row when it started.
UPDATE {schema}.audit_log SET result = $2::text::jsonb WHERE id = $1;

-- control_audit_interrupted --
-- Audit rows ($1) of earlier calls of one replay request that are still 'running' when another call
-- ($2) finishes the request: those calls were cut off (or gave up) part-way.
UPDATE {schema}.audit_log
SET result = jsonb_set(result, '{status}', '"interrupted"')
WHERE id = ANY ($1::bigint[]) AND id <> $2 AND result->>'status' = 'running';

-- control_audit_page --
-- Newest first; $2 is the id of the last entry of the previous page.
SELECT id, at, actor, action, arguments::text AS arguments, result::text AS result, client_identity
FROM {schema}.audit_log
WHERE ($1::text IS NULL OR action = $1)
  AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3;

-- control_stuck_page --
-- Events that failed at least once. Every failed attempt sets next_attempt_at together with attempts
-- (record_failures), so "next_attempt_at IS NOT NULL" is the whole condition, and it is the predicate of
-- the partial index outbox_retrying_idx: the page costs the failed events, never the whole backlog.
SELECT id, message_id, topic, key, attempts, last_error, next_attempt_at, first_attempt_at,
       last_attempt_at, created_at, partition
FROM {schema}.outbox
WHERE published_at IS NULL
  AND next_attempt_at IS NOT NULL
  AND ($1::text IS NULL OR topic = $1)
  AND id > $2
ORDER BY id
LIMIT $3;

-- control_dead_letter_now --
-- Moves one unpublished event to the archive in one statement: it is in exactly one of the two tables.
-- The operator's reason goes first in last_error; the relay's last publish error is kept after it.
WITH moved AS (
    DELETE FROM {schema}.outbox o
    WHERE (o.id = $1::bigint OR o.message_id = $2::uuid) AND o.published_at IS NULL
    RETURNING o.*
)
INSERT INTO {schema}.dead_letter_archive
    (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
     first_attempt_at, last_attempt_at, archived_by)
SELECT id, message_id, topic, key, payload, headers, created_at, attempts, 'operator',
       $3::text || coalesce(E'\nlast publish error: ' || last_error, ''),
       first_attempt_at, last_attempt_at, $4::text
FROM moved
RETURNING id, outbox_id, message_id, topic, key, attempts, reason, last_error, created_at,
          first_attempt_at, last_attempt_at, archived_at, archived_by,
          length(payload)::bigint AS payload_size, 0::bigint AS replay_count;

-- control_dead_letter_now_lock --
-- First step of DeadLetterNow: lock the event's row (waiting for a relay's claim statement that
-- holds it), so that no claim can take it until this transaction ends. Nothing if no such event.
SELECT id, partition
FROM {schema}.outbox
WHERE id = $1::bigint OR message_id = $2::uuid
FOR UPDATE;

-- control_dead_letter_now_fence --
-- Second step, with a fresh snapshot taken after the lock: may a relay be publishing event $1 now?
-- `waiting`: it waits for a retry, so no claim of it is outstanding (a claim needs
-- next_attempt_at <= now(), and each claim ends with the settle or record_failures that set it).
-- `leased`: its partition's lease is held and unexpired, so a relay may have claimed it and be
-- publishing it. clock_timestamp(), not now(): this transaction may have waited for the lock.
SELECT o.published_at IS NOT NULL AS published,
       coalesce(o.next_attempt_at > clock_timestamp(), false) AS waiting,
       o.next_attempt_at,
       l.name AS lease, l.holder, l.token, l.expires_at,
       coalesce(l.holder IS NOT NULL AND l.expires_at > clock_timestamp(), false) AS leased
FROM {schema}.outbox o
LEFT JOIN {schema}.distributed_locks l ON l.name = 'partition:' || o.partition
WHERE o.id = $1;

-- control_outbox_published --
-- Why control_dead_letter_now found nothing: NULL if no such event, else whether it is published.
SELECT published_at IS NOT NULL
FROM {schema}.outbox
WHERE id = $1::bigint OR message_id = $2::uuid;

-- control_dead_letter_page --
WITH page AS (
    SELECT d.id, d.outbox_id, d.message_id, d.topic, d.key, d.attempts, d.reason, d.last_error,
           d.created_at, d.first_attempt_at, d.last_attempt_at, d.archived_at, d.archived_by,
           length(d.payload)::bigint AS payload_size
    FROM {schema}.dead_letter_archive d
    WHERE d.id > $6
      AND {fragment:dead_letter_filter}
    ORDER BY d.id
    LIMIT $7
),
replays AS (
    SELECT r.dead_letter_id, count(*)::bigint AS n
    FROM {schema}.replay_log r
    WHERE r.dead_letter_id IN (SELECT id FROM page)
    GROUP BY r.dead_letter_id
)
SELECT page.*, coalesce(replays.n, 0)::bigint AS replay_count
FROM page LEFT JOIN replays ON replays.dead_letter_id = page.id
ORDER BY page.id;

-- control_dead_letter_get --
SELECT d.id, d.outbox_id, d.message_id, d.topic, d.key, d.attempts, d.reason, d.last_error,
       d.created_at, d.first_attempt_at, d.last_attempt_at, d.archived_at, d.archived_by,
       length(d.payload)::bigint AS payload_size,
       (SELECT count(*) FROM {schema}.replay_log r WHERE r.dead_letter_id = d.id)::bigint AS replay_count,
       d.payload, d.headers::text AS headers
FROM {schema}.dead_letter_archive d
WHERE d.id = $1;

-- control_dead_letter_replays --
SELECT request_id, new_message_id, forced, replayed_by, replayed_at
FROM {schema}.replay_log
WHERE dead_letter_id = $1
ORDER BY id;

-- control_dead_letter_max_id --
SELECT coalesce(max(id), 0)::bigint FROM {schema}.dead_letter_archive;

-- control_rate_take --
-- A token bucket shared by every request and every control-plane replica: refills at $2 tokens a
-- second up to $3, and gives $4 tokens at once, going into debt if it must. The caller waits
-- -tokens/$2 seconds when the result is negative, so the debt is repaid before its rows are used.
-- One atomic statement, autocommitted on its own: the row lock lasts an instant.
INSERT INTO {schema}.rate_buckets AS b (name, tokens, updated_at)
VALUES ($1, $3::float8 - $4::float8, clock_timestamp())
ON CONFLICT (name) DO UPDATE
SET tokens = least($3::float8,
                   b.tokens + $2::float8 * greatest(extract(epoch FROM clock_timestamp() - b.updated_at), 0))
             - $4::float8,
    updated_at = clock_timestamp()
RETURNING tokens;

-- control_rate_give_back --
-- Returns tokens taken but not used (a short chunk, or a call that gave up before using them).
UPDATE {schema}.rate_buckets
SET tokens = least($3::float8, tokens + $2::float8)
WHERE name = $1;

-- control_replay_lock --
-- Serialises the transactions of one request_id; different request_ids run in parallel and meet
-- at the unique index replay_once_idx instead.
SELECT pg_advisory_xact_lock(hashtext('outbox-relay:replay:' || $1::text));

-- control_replay_request_get --
SELECT request_hash, result::text AS result
FROM {schema}.replay_requests
WHERE request_id = $1;

-- control_replay_request_claim --
INSERT INTO {schema}.replay_requests (request_id, request_hash, result, requested_by)
VALUES ($1, $2, $3::text::jsonb, $4);

-- control_replay_request_finish --
UPDATE {schema}.replay_requests SET result = $2::text::jsonb WHERE request_id = $1;

-- control_replay_chunk --
-- Replays up to $10 dead letters with id in ($8, $9], in id order so that per-key order survives.
-- $1..$5 filter, $6 request_id, $7 ids or NULL, $11 force, $12 actor.
-- A dead letter this request already replayed (an earlier attempt, or a concurrent identical call) counts
-- as replayed and is not replayed again. Without force, ON CONFLICT on replay_once_idx skips dead letters
-- another request replayed; the database, not this statement, makes that race-free.
WITH picked AS (
    SELECT d.id, d.message_id, d.topic, d.key, d.payload, d.headers
    FROM {schema}.dead_letter_archive d
    WHERE d.id > $8 AND d.id <= $9
      AND ($7::bigint[] IS NULL OR d.id = ANY ($7::bigint[]))
      AND {fragment:dead_letter_filter}
    ORDER BY d.id
    LIMIT $10
),
mine AS (
    SELECT DISTINCT r.dead_letter_id AS id
    FROM {schema}.replay_log r
    WHERE r.request_id = $6::text AND r.dead_letter_id IN (SELECT id FROM picked)
),
logged AS (
    INSERT INTO {schema}.replay_log
        (dead_letter_id, request_id, original_message_id, new_message_id, forced, replayed_by)
    SELECT p.id, $6::text, p.message_id, gen_random_uuid(), $11::boolean, $12::text
    FROM picked p
    WHERE p.id NOT IN (SELECT id FROM mine)
    ORDER BY p.id
    ON CONFLICT (dead_letter_id) WHERE NOT forced DO NOTHING
    RETURNING dead_letter_id, new_message_id
),
inserted AS (
    INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)
    SELECT l.new_message_id, p.topic, p.key, p.payload,
           p.headers || jsonb_build_object('x-replayed-from', p.message_id::text, 'x-replay-request', $6::text)
    FROM logged l JOIN picked p ON p.id = l.dead_letter_id
    ORDER BY p.id
    RETURNING 1
)
SELECT p.id, (l.dead_letter_id IS NOT NULL OR p.id IN (SELECT id FROM mine)) AS replayed
FROM picked p LEFT JOIN logged l ON l.dead_letter_id = p.id
ORDER BY p.id;

-- control_replay_chunk_dry --
-- What control_replay_chunk would do, changing nothing. Same parameters, without the actor.
WITH picked AS (
    SELECT d.id
    FROM {schema}.dead_letter_archive d
    WHERE d.id > $8 AND d.id <= $9
      AND ($7::bigint[] IS NULL OR d.id = ANY ($7::bigint[]))
      AND {fragment:dead_letter_filter}
    ORDER BY d.id
    LIMIT $10
)
SELECT p.id,
       ($11::boolean
        OR EXISTS (
            SELECT 1 FROM {schema}.replay_log r WHERE r.dead_letter_id = p.id AND r.request_id = $6::text)
        OR NOT EXISTS (
            SELECT 1 FROM {schema}.replay_log r WHERE r.dead_letter_id = p.id AND NOT r.forced)) AS replayed
FROM picked p
ORDER BY p.id;

-- control_purge_batch --
-- Deletes at most $9 dead letters matching the filter ($1..$5) and ids ($6, or NULL) with id in
-- ($7, $8], in id order: one bounded statement of a purge that loops until a batch comes back short.
-- `last_id` is the next batch's $7.
WITH batch AS (
    SELECT d.id
    FROM {schema}.dead_letter_archive d
    WHERE d.id > $7 AND d.id <= $8
      AND ($6::bigint[] IS NULL OR d.id = ANY ($6::bigint[]))
      AND {fragment:dead_letter_filter}
    ORDER BY d.id
    LIMIT $9
),
purged AS (
    DELETE FROM {schema}.dead_letter_archive d
    USING batch
    WHERE d.id = batch.id
    RETURNING d.id
)
SELECT (SELECT count(*) FROM batch)::bigint AS picked,
       (SELECT count(*) FROM purged)::bigint AS purged,
       (SELECT max(id) FROM batch) AS last_id;

-- control_purge_count --
-- How many dead letters match the filter ($1..$5) and ids ($6, or NULL).
SELECT count(*)::bigint
FROM {schema}.dead_letter_archive d
WHERE ($6::bigint[] IS NULL OR d.id = ANY ($6::bigint[]))
  AND {fragment:dead_letter_filter};
