-- Every statement the inbox (clients/inbox) runs, in one place; the table is migration 0006.
-- Blocks are named by a "-- name --" line. {schema} is replaced by the quoted schema name.
-- Placeholders are asyncpg's $1..$n; the other drivers get them rewritten (clients/inbox/statements.py),
-- which is why casts are written CAST(x AS t): SQLAlchemy's text() would read '::' after a bind name.
-- The fence of a claim is (locked_by, attempts): every claim increments attempts, so a worker whose
-- claim was taken over can no longer match it.

-- claim --
-- The atomic claim of message $2 for consumer $1 by worker $3 (topic $4, key $5, stale threshold $6
-- seconds, max attempts $7): one statement that
--   inserts a new row, claimed (attempts 1);
--   or claims a row released after a failure (attempts + 1);
--   or takes over a lock older than the threshold (attempts + 1), unless that dead holder's attempt
--     was already the last allowed one: then the row becomes 'failed' (a message that kills its
--     worker every time is not retried for ever);
--   or changes nothing: processed (a duplicate), failed (given up), or locked by a live worker.
-- `prior` is the row as it is when the claim runs: FOR UPDATE waits for a concurrent claim or mark and
-- reads its result, and the INSERT's source joins `prior`, so the row is locked and read before the
-- INSERT looks at it; the upsert's WHERE thus judges the very row `prior` reports. A row inserted by a
-- concurrent claim after this statement's snapshot is absent from `prior` (and not claimed here):
-- then the caller reads it with `state`.
WITH prior AS (
    SELECT p.status, p.locked_by, p.attempts, p.last_error,
           CAST(extract(epoch FROM now() - p.locked_at) AS float8) AS lock_age
    FROM {schema}.inbox p
    WHERE p.consumer = CAST($1 AS text) AND p.message_id = CAST($2 AS text)
    FOR UPDATE
),
claimed AS (
    INSERT INTO {schema}.inbox AS i (consumer, message_id, status, locked_at, locked_by, attempts, topic, key)
    SELECT CAST($1 AS text), CAST($2 AS text), 'processing', now(), CAST($3 AS text), 1,
           CAST($4 AS text), CAST($5 AS text)
    FROM (SELECT 1) AS one LEFT JOIN prior ON true
    ON CONFLICT (consumer, message_id) DO UPDATE
    SET status = CASE WHEN i.locked_at IS NOT NULL AND i.attempts >= CAST($7 AS integer)
                      THEN 'failed' ELSE 'processing' END,
        locked_at = CASE WHEN i.locked_at IS NOT NULL AND i.attempts >= CAST($7 AS integer)
                         THEN NULL ELSE now() END,
        locked_by = CASE WHEN i.locked_at IS NOT NULL AND i.attempts >= CAST($7 AS integer)
                         THEN NULL ELSE excluded.locked_by END,
        attempts = CASE WHEN i.locked_at IS NOT NULL AND i.attempts >= CAST($7 AS integer)
                        THEN i.attempts ELSE i.attempts + 1 END,
        last_error = CASE WHEN i.locked_at IS NOT NULL AND i.attempts >= CAST($7 AS integer)
                          THEN 'gave up after ' || i.attempts || ' attempts: worker ' || i.locked_by
                               || ' stopped during the last one (its lock went stale)'
                          ELSE i.last_error END
    WHERE i.status = 'processing'
      AND (i.locked_at IS NULL OR i.locked_at <= now() - make_interval(secs => CAST($6 AS float8)))
    RETURNING i.status, i.attempts, i.last_error
)
SELECT c.status, c.attempts, c.last_error, p.status, p.locked_by, p.attempts, p.last_error, p.lock_age
FROM (SELECT 1) AS one LEFT JOIN claimed c ON true LEFT JOIN prior p ON true

-- state --
-- Message $2 of consumer $1 as it is now: when `claim` claimed nothing and saw no row (a concurrent
-- claim inserted it), what holds it.
SELECT status, locked_by, attempts, last_error,
       CAST(extract(epoch FROM now() - locked_at) AS float8) AS lock_age
FROM {schema}.inbox
WHERE consumer = CAST($1 AS text) AND message_id = CAST($2 AS text)

-- mark_processed --
-- In the handler's transaction, after the handler: the processed mark, fenced by the claim (worker $3,
-- attempts $4). No row back: the claim was taken over (the lock went stale) and the caller rolls the
-- whole transaction back, the handler's changes with it.
UPDATE {schema}.inbox
SET status = 'processed', processed_at = clock_timestamp(), locked_at = NULL, locked_by = NULL
WHERE consumer = CAST($1 AS text) AND message_id = CAST($2 AS text) AND status = 'processing'
  AND locked_by = CAST($3 AS text) AND attempts = CAST($4 AS integer)
RETURNING attempts

-- release --
-- After the handler's transaction rolled back: release the claim (worker $3, attempts $4) and record
-- the error $5; at $6 attempts or more the row becomes 'failed' and is not claimed again.
UPDATE {schema}.inbox
SET locked_at = NULL, locked_by = NULL, last_error = CAST($5 AS text),
    status = CASE WHEN attempts >= CAST($6 AS integer) THEN 'failed' ELSE 'processing' END
WHERE consumer = CAST($1 AS text) AND message_id = CAST($2 AS text) AND status = 'processing'
  AND locked_by = CAST($3 AS text) AND attempts = CAST($4 AS integer)
RETURNING status, attempts

-- count_stale_locks --
-- Claims of consumer $1 older than the stale threshold ($2 seconds): workers presumed dead whose
-- messages wait for a takeover. Served by the partial index on locked_at.
SELECT count(*)
FROM {schema}.inbox
WHERE consumer = CAST($1 AS text) AND locked_at IS NOT NULL
  AND locked_at <= now() - make_interval(secs => CAST($2 AS float8))
