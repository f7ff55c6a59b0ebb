-- Every statement of the gRPC control plane (control/store.py), in one place.
-- Blocks are named by a "-- name --" line. {schema} is replaced by the quoted schema name.
-- jsonb crosses the wire as text (::text / $n::text::jsonb) so that no pool codec changes its meaning.
-- Dead-letter filters take five parameters in one order: topic, key, reason, archived_after, archived_before;
-- NULL means "any".

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
SELECT topic, count(*)::bigint AS pending, now() - min(created_at) AS oldest_age
FROM {schema}.outbox
WHERE published_at IS NULL
GROUP BY topic
ORDER BY topic;

-- control_status_dead_letters --
SELECT count(*)::bigint FROM {schema}.dead_letter_archive;

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
INSERT INTO {schema}.audit_log (actor, action, arguments, result)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb);

-- control_audit_page --
-- Newest first; $2 is the id of the last entry of the previous page.
SELECT id, at, actor, action, arguments::text AS arguments, result::text AS result
FROM {schema}.audit_log
WHERE ($1::text IS NULL OR action = $1)
  AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3;

-- control_stuck_page --
SELECT id, message_id, topic, key, attempts, last_error, next_attempt_at, first_attempt_at,
       last_attempt_at, created_at, partition
FROM {schema}.outbox
WHERE published_at IS NULL
  AND (attempts > 0 OR next_attempt_at IS NOT NULL)
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
    WHERE ($1::text IS NULL OR d.topic = $1)
      AND ($2::text IS NULL OR d.key = $2)
      AND ($3::text IS NULL OR d.reason = $3)
      AND ($4::timestamptz IS NULL OR d.archived_at >= $4)
      AND ($5::timestamptz IS NULL OR d.archived_at < $5)
      AND d.id > $6
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
-- $1 request_id, $2 ids or NULL, $3..$7 filter, $11 force, $12 actor.
-- A dead letter this request already replayed (an earlier attempt, or a concurrent identical call) counts
-- as replayed and is not replayed again. Without force, ON CONFLICT on replay_once_idx skips dead letters
-- another request replayed; the database, not this statement, makes that race-free.
WITH picked AS (
    SELECT d.id, d.message_id, d.topic, d.key, d.payload, d.headers
    FROM {schema}.dead_letter_archive d
    WHERE d.id > $8 AND d.id <= $9
      AND ($2::bigint[] IS NULL OR d.id = ANY ($2::bigint[]))
      AND ($3::text IS NULL OR d.topic = $3)
      AND ($4::text IS NULL OR d.key = $4)
      AND ($5::text IS NULL OR d.reason = $5)
      AND ($6::timestamptz IS NULL OR d.archived_at >= $6)
      AND ($7::timestamptz IS NULL OR d.archived_at < $7)
    ORDER BY d.id
    LIMIT $10
),
mine AS (
    SELECT DISTINCT r.dead_letter_id AS id
    FROM {schema}.replay_log r
    WHERE r.request_id = $1::text AND r.dead_letter_id IN (SELECT id FROM picked)
),
logged AS (
    INSERT INTO {schema}.replay_log
        (dead_letter_id, request_id, original_message_id, new_message_id, forced, replayed_by)
    SELECT p.id, $1::text, p.message_id, gen_random_uuid(), $11::boolean, $12::text
    FROM picked p
    WHERE p.id NOT IN (SELECT id FROM mine)
    ORDER BY p.id
    ON CONFLICT (dead_letter_id) WHERE NOT forced DO NOTHING
    RETURNING dead_letter_id, new_message_id
),
inserted AS (
    INSERT INTO {schema}.outbox (message_id, topic, key, payload, headers)
    SELECT l.new_message_id, p.topic, p.key, p.payload,
           p.headers || jsonb_build_object('x-replayed-from', p.message_id::text, 'x-replay-request', $1::text)
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
      AND ($2::bigint[] IS NULL OR d.id = ANY ($2::bigint[]))
      AND ($3::text IS NULL OR d.topic = $3)
      AND ($4::text IS NULL OR d.key = $4)
      AND ($5::text IS NULL OR d.reason = $5)
      AND ($6::timestamptz IS NULL OR d.archived_at >= $6)
      AND ($7::timestamptz IS NULL OR d.archived_at < $7)
    ORDER BY d.id
    LIMIT $10
)
SELECT p.id,
       ($11::boolean
        OR EXISTS (
            SELECT 1 FROM {schema}.replay_log r WHERE r.dead_letter_id = p.id AND r.request_id = $1::text)
        OR NOT EXISTS (
            SELECT 1 FROM {schema}.replay_log r WHERE r.dead_letter_id = p.id AND NOT r.forced)) AS replayed
FROM picked p
ORDER BY p.id;

-- control_purge --
WITH purged AS (
    DELETE FROM {schema}.dead_letter_archive d
    WHERE ($1::bigint[] IS NULL OR d.id = ANY ($1::bigint[]))
      AND ($2::text IS NULL OR d.topic = $2)
      AND ($3::text IS NULL OR d.key = $3)
      AND ($4::text IS NULL OR d.reason = $4)
      AND ($5::timestamptz IS NULL OR d.archived_at >= $5)
      AND ($6::timestamptz IS NULL OR d.archived_at < $6)
    RETURNING 1
)
SELECT count(*)::bigint FROM purged;

-- control_purge_count --
SELECT count(*)::bigint
FROM {schema}.dead_letter_archive d
WHERE ($1::bigint[] IS NULL OR d.id = ANY ($1::bigint[]))
  AND ($2::text IS NULL OR d.topic = $2)
  AND ($3::text IS NULL OR d.key = $3)
  AND ($4::text IS NULL OR d.reason = $4)
  AND ($5::timestamptz IS NULL OR d.archived_at >= $5)
  AND ($6::timestamptz IS NULL OR d.archived_at < $6);
