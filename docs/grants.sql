-- Least-privilege grants for the three kinds of database users of Outbox Relay: writers (your
-- services), relays (`outbox-relay run`) and operators (`outbox-relay control`). See
-- docs/operations.md, "Database roles". tests/acceptance/test_least_privilege.py runs this very file.
--
-- Run it as the role that owns the schema (the one that runs `outbox-relay migrate`), once the
-- roles exist, and again after every `outbox-relay migrate`: it is idempotent.
--
--   psql -v ON_ERROR_STOP=1 -v schema=outbox \
--        -v writer=outbox_writer -v relay=outbox_relay -v operator=outbox_operator \
--        -f docs/grants.sql "$OWNER_DATABASE_URL"
--
-- It is written for the schema at the head revision of this release (0007). No sequence privilege is
-- needed: every id is an identity column. Tables a later migration adds get the relay's and the
-- operator's table privileges at once (ALTER DEFAULT PRIVILEGES below); re-running this file then
-- applies the narrower per-table rules.

-- Only these roles reach the schema.
REVOKE ALL ON SCHEMA :"schema" FROM PUBLIC;
GRANT USAGE ON SCHEMA :"schema" TO :"writer", :"relay", :"operator";

-- Writers: insert events into the outbox, and nothing else. INSERT only on the columns a writer may
-- set (the relay's bookkeeping columns stay out of reach). SELECT on the same columns and `id` is
-- what `ON CONFLICT (message_id)` (a writer's idempotency), `RETURNING id` and the Python writer's
-- conflict check need; a writer sees no delivery state, no dead letter, no lease.
GRANT INSERT (message_id, topic, key, payload, headers) ON :"schema".outbox TO :"writer";
GRANT SELECT (id, message_id, topic, key, payload, headers) ON :"schema".outbox TO :"writer";

-- Consuming services (the inbox of clients.inbox, docs/consumers.md) run as the writer role too: they
-- claim, mark and release their own inbox rows. Deleting them is the retention clean-up's job (the
-- relay role: its leader, or `outbox-relay inbox-cleanup`).
GRANT SELECT, INSERT, UPDATE ON :"schema".inbox TO :"writer";

-- The SQL API (docs/sql-api.md): functions run with the caller's privileges (SECURITY INVOKER), so
-- EXECUTE adds no reach beyond the table grants; it says which role calls which function. Nobody
-- else may call one (PostgreSQL grants EXECUTE on a new function to PUBLIC).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA :"schema" FROM PUBLIC;
-- Writers publish events; publish_outbox calls _publish_outbox, its shared implementation.
GRANT EXECUTE ON FUNCTION
    :"schema".publish_outbox(text, text, bytea, jsonb, uuid, integer),
    :"schema".publish_outbox(text, text, text, jsonb, uuid, integer),
    :"schema".publish_outbox(text, text, jsonb, jsonb, uuid, integer),
    :"schema"._publish_outbox(text, text, bytea, jsonb, uuid, integer, boolean)
    TO :"writer";
-- Relays: leases and the relay's own steps (what a relay written in another language would run).
GRANT EXECUTE ON FUNCTION
    :"schema".acquire_lock(text, text, double precision),
    :"schema".extend_lock(text, text, bigint, double precision),
    :"schema".extend_locks(text[], bigint[], text, double precision),
    :"schema".release_lock(text, text, bigint),
    :"schema".release_locks(text[], bigint[], text),
    :"schema".cleanup_expired_locks(),
    :"schema".claim_outbox_events(integer, text, text, bigint, integer, text[], bigint, text[]),
    :"schema".complete_outbox_event(bigint[], text, text, bigint, boolean),
    :"schema".record_outbox_failure(bigint[], text, text, bigint, double precision[], text[]),
    :"schema".archive_dead_letter(bigint[], text, text, bigint, text[], text[])
    TO :"relay";
-- Operators: replay dead letters, and release (never take) a lease, as the control plane does.
GRANT EXECUTE ON FUNCTION
    :"schema".record_replay(text, text, text, timestamptz, timestamptz, text, bigint[], bigint, bigint,
                            integer, boolean, text),
    :"schema".release_lock(text, text, bigint),
    :"schema".release_locks(text[], bigint[], text),
    :"schema".cleanup_expired_locks()
    TO :"operator";

-- Relays: rows of every table, then narrower rules. A relay never creates an event, nor changes
-- one: on the outbox it reads, deletes (settles) and updates the delivery columns only.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA :"schema" TO :"relay";
REVOKE INSERT, UPDATE ON :"schema".outbox FROM :"relay";
GRANT UPDATE (attempts, next_attempt_at, last_error, first_attempt_at, last_attempt_at, published_at)
    ON :"schema".outbox TO :"relay";
-- The consumers' inbox: the relay counts stale claims and deletes expired processed rows, no more.
REVOKE INSERT, UPDATE ON :"schema".inbox FROM :"relay";
-- Dead letters: the relay archives them; operators replay and purge them.
REVOKE UPDATE, DELETE ON :"schema".dead_letter_archive FROM :"relay";
-- Read only for a relay: the schema's own records, and the operators' tables.
REVOKE INSERT, UPDATE, DELETE
    ON :"schema".alembic_version, :"schema".relay_settings, :"schema".audit_log,
       :"schema".replay_requests, :"schema".replay_log, :"schema".rate_buckets
    FROM :"relay";

-- Operators (the control plane): rows of every table, then narrower rules. They keep full access
-- to the outbox (DeadLetterNow deletes and locks events, ReplayDeadLetters inserts them), the
-- dead-letter archive (archive, purge), pauses, and the replay bookkeeping.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA :"schema" TO :"operator";
-- Relays' own records: read; a lease may be released (UPDATE), never created or deleted.
REVOKE INSERT, UPDATE, DELETE ON :"schema".relay_instances FROM :"operator";
REVOKE INSERT, DELETE ON :"schema".distributed_locks FROM :"operator";
REVOKE INSERT, UPDATE, DELETE ON :"schema".alembic_version, :"schema".relay_settings FROM :"operator";
-- Dead letters are archived and purged, never edited.
REVOKE UPDATE ON :"schema".dead_letter_archive FROM :"operator";
-- The audit trail is append-only: an entry's outcome (`result`) is filled in when a long call ends,
-- nothing else changes, and nothing is deleted. Likewise the record of replays.
REVOKE UPDATE, DELETE ON :"schema".audit_log FROM :"operator";
GRANT UPDATE (result) ON :"schema".audit_log TO :"operator";
REVOKE UPDATE, DELETE ON :"schema".replay_log FROM :"operator";
REVOKE DELETE ON :"schema".replay_requests, :"schema".rate_buckets FROM :"operator";

-- Tables created later by the role running this file (migrations) are usable at once.
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"relay", :"operator";
