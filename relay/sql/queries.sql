-- Every statement Outbox Relay runs at run time, in one place.
-- Blocks are named by a "-- name --" line. {schema} is replaced by the quoted schema name.
-- {fragment:name} inlines block `name` (its leading comments dropped, its lines indented as far as
-- the placeholder's line): a clause written once and used by several statements.
-- Lease checks ("fencing") sit in the same statement as the write they guard: every write on the
-- relay path uses {fragment:lease_fence}, with the fence in $2 (lease name), $3 (holder), $4 (token).

-- lease_fence --
-- True while the partition lease of outbox row `o` is still held by this holder with this token.
-- A fragment, never run on its own: always with the fence in $2, $3, $4 and the outbox row as `o`.
EXISTS (
    SELECT 1 FROM {schema}.distributed_locks l
    WHERE l.name = $2 AND l.name = 'partition:' || o.partition
      AND l.holder = $3 AND l.token = $4 AND l.expires_at > now())

-- claim_blocked --
-- A fragment of the claim statements: the (topic, key)s of partition $1 whose earliest row waits for
-- a retry; their later rows are held back.
blocked AS (
    SELECT topic, key, min(id) AS first_id
    FROM {schema}.outbox
    WHERE partition = $1 AND published_at IS NULL AND next_attempt_at > now() AND key IS NOT NULL
    GROUP BY topic, key
)

-- claim_row_size --
-- A fragment of the claim statements: the bytes of outbox row `o` the claim budget counts.
-- octet_length does not detoast: sizing a row reads no payload.
octet_length(o.payload)::bigint + coalesce(octet_length(o.key), 0)
    + octet_length(o.headers::text)

-- claim_claimable --
-- A fragment of the claim statements: outbox row `o` may be claimed now by the holder of partition
-- $1's lease ($2-$4): unpublished, due, not paused ($6, LIKE patterns), not skipped ($8), not behind
-- an earlier row of its key that waits for a retry (`blocked`).
o.partition = $1
  AND o.published_at IS NULL
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
  AND NOT (o.topic LIKE ANY ($6::text[]))
  AND o.topic <> ALL ($8::text[])
  AND NOT EXISTS (
      SELECT 1 FROM blocked b WHERE b.topic = o.topic AND b.key = o.key AND b.first_id < o.id)
  AND {fragment:lease_fence}

-- claim_sized --
-- A fragment of the claim statements: each candidate's place and the running sum of their sizes.
sized AS (
    SELECT id,
           row_number() OVER w AS n,
           sum(size) OVER (w ROWS UNBOUNDED PRECEDING) AS running
    FROM candidates
    WINDOW w AS (ORDER BY id)
)

-- claim_batch --
-- The oldest publishable rows of one partition ($1), in id order: at most $5 rows, and only the
-- prefix whose payload, key and header bytes add up to at most $7 (but always the first row, so an
-- event larger than the budget still moves). A (topic, key) whose earliest row waits for a retry
-- holds back its later rows; paused topics ($6, LIKE patterns) and skipped topics ($8) are left
-- alone. $2-$4: the fence.
-- Postgres allows no window function beside FOR UPDATE, so `candidates` locks ids and sizes and the
-- running sum is taken outside it.
WITH {fragment:claim_blocked},
candidates AS MATERIALIZED (
    SELECT o.id,
           {fragment:claim_row_size} AS size
    FROM {schema}.outbox o
    WHERE {fragment:claim_claimable}
    ORDER BY o.id
    LIMIT $5
    FOR UPDATE OF o SKIP LOCKED
),
{fragment:claim_sized}
SELECT o.id, o.message_id, o.topic, o.key, o.payload, o.headers::text AS headers,
       o.created_at, o.attempts, o.first_attempt_at
FROM sized s
JOIN {schema}.outbox o ON o.id = s.id
WHERE s.n = 1 OR s.running <= $7::bigint
ORDER BY o.id;

-- claim_after_settling --
-- A fragment: the rest of settle_delete_and_claim / settle_retain_and_claim after their `settled`
-- CTE. Every part of a statement sees the same snapshot, so the rows being settled ($9) would still
-- look claimable: they are left out by id. Always at least one row, whose `settled` says how many of
-- $9 were settled; a row with a NULL id stands for "nothing claimed".
{fragment:claim_blocked},
candidates AS MATERIALIZED (
    SELECT o.id,
           {fragment:claim_row_size} AS size
    FROM {schema}.outbox o
    WHERE {fragment:claim_claimable}
      AND o.id <> ALL ($9::bigint[])
    ORDER BY o.id
    LIMIT $5
    FOR UPDATE OF o SKIP LOCKED
),
{fragment:claim_sized},
claimed AS (
    SELECT o.id, o.message_id, o.topic, o.key, o.payload, o.headers::text AS headers,
           o.created_at, o.attempts, o.first_attempt_at
    FROM sized s
    JOIN {schema}.outbox o ON o.id = s.id
    WHERE s.n = 1 OR s.running <= $7::bigint
)
SELECT c.*, (SELECT count(*) FROM settled) AS settled
FROM (VALUES (1)) AS one (n)
LEFT JOIN claimed c ON true
ORDER BY c.id;

-- settle_delete_and_claim --
-- settle_delete of the previous batch's published rows ($9) and claim_batch in one round trip, for
-- a worker that claims again straight after publishing (the fence, $2-$4, guards both).
WITH settled AS (
    DELETE FROM {schema}.outbox o
    WHERE o.id = ANY ($9::bigint[])
      AND {fragment:lease_fence}
    RETURNING o.id
),
{fragment:claim_after_settling}

-- settle_retain_and_claim --
-- settle_retain of $9 and claim_batch in one round trip (see settle_delete_and_claim).
WITH settled AS (
    UPDATE {schema}.outbox o
    SET published_at = now()
    WHERE o.id = ANY ($9::bigint[])
      AND {fragment:lease_fence}
    RETURNING o.id
),
{fragment:claim_after_settling}

-- next_retry_delay --
-- Seconds until the earliest retry of a partition is due (NULL when nothing waits).
SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()), 0)::float8
FROM {schema}.outbox
WHERE partition = $1 AND published_at IS NULL AND next_attempt_at > now();

-- settle_delete --
DELETE FROM {schema}.outbox o
WHERE o.id = ANY ($1::bigint[])
  AND {fragment:lease_fence};

-- settle_retain --
UPDATE {schema}.outbox o
SET published_at = now()
WHERE o.id = ANY ($1::bigint[])
  AND {fragment:lease_fence};

-- record_failures --
-- $5: per-row delay in seconds before the next attempt; $6: per-row error text.
UPDATE {schema}.outbox o
SET attempts = o.attempts + 1,
    next_attempt_at = now() + make_interval(secs => f.delay),
    last_error = f.error,
    first_attempt_at = coalesce(o.first_attempt_at, now()),
    last_attempt_at = now()
FROM unnest($1::bigint[], $5::float8[], $6::text[]) AS f(id, delay, error)
WHERE o.id = f.id
  AND {fragment:lease_fence};

-- dead_letter --
-- Moves rows to the archive in one statement: an event is in exactly one of the two tables.
WITH moved AS (
    DELETE FROM {schema}.outbox o
    USING unnest($1::bigint[], $5::text[], $6::text[]) AS f(id, reason, error)
    WHERE o.id = f.id
      AND {fragment:lease_fence}
    RETURNING o.*, f.reason, f.error
)
INSERT INTO {schema}.dead_letter_archive
    (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
     first_attempt_at, last_attempt_at, archived_by)
SELECT id, message_id, topic, key, payload, headers, created_at, attempts + 1, reason, error,
       coalesce(first_attempt_at, now()), now(), $3
FROM moved
RETURNING id, outbox_id, reason;

-- lease_acquire --
-- Takes a free or expired lease; the fencing token grows on every change of hands.
INSERT INTO {schema}.distributed_locks AS l (name, holder, token, acquired_at, renewed_at, expires_at)
VALUES ($1, $2, 1, now(), now(), now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder, token = l.token + 1, acquired_at = now(), renewed_at = now(),
    expires_at = excluded.expires_at
WHERE l.holder IS NULL OR l.expires_at <= now()
RETURNING l.token;

-- lease_renew --
-- Extends every lease still held; the names not returned were lost.
UPDATE {schema}.distributed_locks l
SET expires_at = now() + make_interval(secs => $4), renewed_at = now()
FROM unnest($1::text[], $2::bigint[]) AS h(name, token)
WHERE l.name = h.name AND l.token = h.token AND l.holder = $3 AND l.expires_at > now()
RETURNING l.name;

-- lease_release --
UPDATE {schema}.distributed_locks l
SET holder = NULL, expires_at = now()
FROM unnest($1::text[], $2::bigint[]) AS h(name, token)
WHERE l.name = h.name AND l.token = h.token AND l.holder = $3;

-- lease_claimable --
-- Partition leases nobody holds (never taken, released or expired).
SELECT p AS partition
FROM generate_series(0, $1 - 1) AS p
LEFT JOIN {schema}.distributed_locks l ON l.name = 'partition:' || p
WHERE l.name IS NULL OR l.holder IS NULL OR l.expires_at <= now()
ORDER BY p;

-- instance_heartbeat --
-- Registers or refreshes this instance with its health ($7: why it is unhealthy, NULL when healthy)
-- and returns every live instance, this one included, with its health, sorted by id. This
-- instance's row comes from `beat` (what was just written); the others as last written (older
-- relays never write unhealthy_reason, so they count as healthy).
WITH beat AS (
    INSERT INTO {schema}.relay_instances AS i
        (instance_id, hostname, pid, version, started_at, heartbeat_at, partitions, unhealthy_reason)
    VALUES ($1, $2, $3, $4, now(), now(), $5::int[], $7)
    ON CONFLICT (instance_id) DO UPDATE
    SET heartbeat_at = now(), partitions = excluded.partitions, stopped_at = NULL,
        started_at = CASE WHEN i.stopped_at IS NULL THEN i.started_at ELSE now() END,
        unhealthy_reason = excluded.unhealthy_reason
    RETURNING instance_id, unhealthy_reason
)
SELECT instance_id, unhealthy_reason FROM beat
UNION ALL
SELECT instance_id, unhealthy_reason FROM {schema}.relay_instances
WHERE instance_id <> $1 AND stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $6)
ORDER BY instance_id;

-- instance_stopped --
UPDATE {schema}.relay_instances SET stopped_at = now(), partitions = '{}', unhealthy_reason = NULL
WHERE instance_id = $1;

-- pauses_active --
SELECT topic_pattern FROM {schema}.pauses WHERE expires_at IS NULL OR expires_at > now();

-- partition_count --
SELECT value::int FROM {schema}.relay_settings WHERE name = 'partitions';

-- schema_revision --
SELECT version_num FROM {schema}.alembic_version;

-- cleanup_published --
DELETE FROM {schema}.outbox
WHERE id IN (
    SELECT id FROM {schema}.outbox
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
    ORDER BY id
    LIMIT $2);

-- inbox_cleanup --
-- The consumers' inbox (clients/inbox): processed rows older than the retention ($1 seconds), oldest
-- first, at most $2 of them, in one short statement; rows still processing or failed are never deleted.
-- No FOR UPDATE (it needs UPDATE, which the relay role lacks on the inbox): a processed row is only ever
-- locked by a redelivery's claim, itself one short statement, and re-checked by the DELETE after it.
DELETE FROM {schema}.inbox
WHERE id IN (
    SELECT id FROM {schema}.inbox
    WHERE status = 'processed' AND processed_at < now() - make_interval(secs => $1)
    ORDER BY processed_at
    LIMIT $2)
  AND status = 'processed';

-- inbox_cleanup_counts --
-- What `inbox-cleanup --dry-run` reports: processed rows past the retention ($1 seconds) and those kept.
SELECT count(*) FILTER (WHERE status = 'processed' AND processed_at < now() - make_interval(secs => $1)),
       count(*) FILTER (WHERE status = 'processed' AND processed_at >= now() - make_interval(secs => $1)),
       count(*) FILTER (WHERE status = 'processing'),
       count(*) FILTER (WHERE status = 'failed')
FROM {schema}.inbox;

-- inbox_stale_locks --
-- Per consumer, inbox claims older than the consumers' stale threshold ($1 seconds): workers presumed
-- dead, whose messages wait for a redelivery to take them over. The partial index on locked_at.
SELECT consumer, count(*)::bigint AS stale
FROM {schema}.inbox
WHERE locked_at IS NOT NULL AND locked_at <= now() - make_interval(secs => $1)
GROUP BY consumer
ORDER BY consumer
LIMIT 1000;

-- cleanup_expired_pauses --
DELETE FROM {schema}.pauses WHERE expires_at IS NOT NULL AND expires_at <= now() - interval '1 day';

-- cleanup_instances --
DELETE FROM {schema}.relay_instances
WHERE heartbeat_at < now() - interval '1 day';

-- retention_audit --
-- Deletes at most $2 audit_log rows older than $1 seconds, oldest first (audit_log_at_idx).
DELETE FROM {schema}.audit_log
WHERE id IN (
    SELECT id FROM {schema}.audit_log
    WHERE at < now() - make_interval(secs => $1)
    ORDER BY at
    LIMIT $2);

-- retention_replay_log --
-- Deletes at most $2 replay_log rows older than $1 seconds whose dead letter is gone (expired or
-- purged). While the dead letter exists its replay_log rows stay: they are what stops a second
-- unforced replay of it (replay_once_idx).
DELETE FROM {schema}.replay_log
WHERE id IN (
    SELECT r.id FROM {schema}.replay_log r
    WHERE r.replayed_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM {schema}.dead_letter_archive d WHERE d.id = r.dead_letter_id)
    ORDER BY r.replayed_at
    LIMIT $2);

-- retention_replay_requests --
-- Deletes at most $2 replay request records (the answers kept for request-id retries) older than $1 s.
DELETE FROM {schema}.replay_requests
WHERE request_id IN (
    SELECT request_id FROM {schema}.replay_requests
    WHERE created_at < now() - make_interval(secs => $1)
    ORDER BY created_at
    LIMIT $2);

-- retention_dead_letters --
-- Deletes at most $2 dead letters archived more than $1 seconds ago, except those being replayed:
-- a replay whose new outbox row is not yet published (replay_log.new_message_id). A replay running
-- at this very moment read its dead letters already: its new events are written whatever happens
-- here, and its replay_log rows, orphaned, go with retention_replay_log later.
-- No FOR UPDATE in these subqueries: it needs UPDATE privilege, and only the leader deletes.
DELETE FROM {schema}.dead_letter_archive
WHERE id IN (
    SELECT d.id FROM {schema}.dead_letter_archive d
    WHERE d.archived_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (
          SELECT 1
          FROM {schema}.replay_log r
          JOIN {schema}.outbox o ON o.message_id = r.new_message_id
          WHERE r.dead_letter_id = d.id AND o.published_at IS NULL)
    ORDER BY d.archived_at
    LIMIT $2);

-- backlog_by_topic --
SELECT topic, count(*)::bigint AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age
FROM {schema}.outbox
WHERE published_at IS NULL
GROUP BY topic
ORDER BY topic;

-- dead_letter_count --
SELECT count(*)::bigint FROM {schema}.dead_letter_archive;

-- liveness_lock --
-- Held for the life of this instance's dedicated liveness session ($1: '<schema>/<instance_id>').
-- The server drops it the moment the session ends, e.g. because the process died. A try: another
-- session may hold it (the lingering backend of a previous process with the same instance id).
SELECT pg_try_advisory_lock(hashtextextended($1, 0));

-- liveness_key_held --
-- A fragment: true while some session holds the liveness lock named by `{schema}/holder` in $1 || h.holder.
EXISTS (
    SELECT 1 FROM pg_locks k
    WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
      AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((k.classid::int8 << 32) | k.objid::int8) = hashtextextended($1 || h.holder, 0))

-- liveness_peers --
-- Every other holder of an unexpired lease ($2: this instance), with whether its liveness lock is
-- held right now ($1: '<schema>/').
-- Only the relay's own leases: applications' leases (clients/leases.py) share the table.
SELECT h.holder, {fragment:liveness_key_held} AS alive
FROM (SELECT DISTINCT holder FROM {schema}.distributed_locks
      WHERE holder IS NOT NULL AND holder <> $2 AND expires_at > now()
        AND (name = 'leader' OR name LIKE 'partition:%')) h;

-- liveness_expire_dead --
-- The holder $2 was seen holding its liveness lock and now does not: its session ended, so its
-- process is gone. Its leases expire now (the fence of any write it might still send fails), and
-- it stops counting as live, so that the survivors' fair share grows to cover its partitions.
-- Guarded by the lock still being free, in the same statement.
WITH h AS (SELECT $2::text AS holder),
dead AS (SELECT holder FROM h WHERE NOT {fragment:liveness_key_held}),
expired AS (
    UPDATE {schema}.distributed_locks l SET expires_at = now()
    FROM dead WHERE l.holder = dead.holder AND l.expires_at > now()
      AND (l.name = 'leader' OR l.name LIKE 'partition:%')
    RETURNING l.name
),
stopped AS (
    UPDATE {schema}.relay_instances i SET stopped_at = now()
    FROM dead WHERE i.instance_id = dead.holder AND i.stopped_at IS NULL
    RETURNING i.instance_id
)
SELECT name FROM expired ORDER BY name;
