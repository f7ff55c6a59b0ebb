"""Initial schema: the outbox contract, leases, instances, dead letters, replays, pauses and audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

from relay.migrations.context import partitions, schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    n = partitions()
    channel = s.strip('"') + ".outbox_inserted"
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
    op.execute(f"""
        CREATE TABLE {s}.relay_settings (
            name text PRIMARY KEY,
            value text NOT NULL
        )""")
    op.execute(f"INSERT INTO {s}.relay_settings (name, value) VALUES ('partitions', '{n}')")
    # The public contract: services in any language INSERT (topic, key, payload[, headers, message_id]).
    op.execute(f"""
        CREATE TABLE {s}.outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            message_id uuid NOT NULL DEFAULT gen_random_uuid(),
            topic text NOT NULL CHECK (topic <> '' AND length(topic) <= 249),
            key text,
            payload bytea NOT NULL,
            headers jsonb NOT NULL DEFAULT '{{}}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
            created_at timestamptz NOT NULL DEFAULT now(),
            partition integer NOT NULL
                GENERATED ALWAYS AS ((hashtext(coalesce(key, message_id::text))::bigint & 2147483647) % {n}) STORED,
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz,
            last_error text,
            first_attempt_at timestamptz,
            last_attempt_at timestamptz,
            published_at timestamptz,
            CONSTRAINT outbox_message_id_key UNIQUE (message_id)
        )""")
    op.execute(f"CREATE INDEX outbox_pending_idx ON {s}.outbox (partition, id) WHERE published_at IS NULL")
    op.execute(f"""
        CREATE INDEX outbox_retrying_idx ON {s}.outbox (partition, topic, key, id)
        WHERE next_attempt_at IS NOT NULL AND published_at IS NULL""")
    op.execute(
        f"CREATE INDEX outbox_published_idx ON {s}.outbox (published_at) WHERE published_at IS NOT NULL"
    )
    # One notification per partition and statement, whatever the number of rows inserted.
    op.execute(f"""
        CREATE FUNCTION {s}.notify_outbox_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{channel}', p::text) FROM (SELECT DISTINCT partition AS p FROM inserted) ps;
            RETURN NULL;
        END $$""")
    op.execute(f"""
        CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_outbox_inserted()""")
    op.execute(f"""
        CREATE TABLE {s}.distributed_locks (
            name text PRIMARY KEY,
            holder text,
            token bigint NOT NULL DEFAULT 0,
            acquired_at timestamptz,
            renewed_at timestamptz,
            expires_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE {s}.relay_instances (
            instance_id text PRIMARY KEY,
            hostname text NOT NULL,
            pid integer NOT NULL,
            version text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            stopped_at timestamptz,
            partitions integer[] NOT NULL DEFAULT '{{}}'
        )""")
    op.execute(f"""
        CREATE TABLE {s}.dead_letter_archive (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            outbox_id bigint NOT NULL,
            message_id uuid NOT NULL,
            topic text NOT NULL,
            key text,
            payload bytea NOT NULL,
            headers jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            created_at timestamptz NOT NULL,
            attempts integer NOT NULL,
            reason text NOT NULL,
            last_error text,
            first_attempt_at timestamptz,
            last_attempt_at timestamptz,
            archived_at timestamptz NOT NULL DEFAULT now(),
            archived_by text NOT NULL
        )""")
    op.execute(f"CREATE INDEX dead_letter_topic_idx ON {s}.dead_letter_archive (topic, archived_at)")
    op.execute(f"CREATE INDEX dead_letter_key_idx ON {s}.dead_letter_archive (key)")
    op.execute(f"CREATE INDEX dead_letter_message_idx ON {s}.dead_letter_archive (message_id)")
    op.execute(f"""
        CREATE TABLE {s}.replay_requests (
            request_id text PRIMARY KEY,
            request_hash text NOT NULL,
            result jsonb NOT NULL,
            requested_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE {s}.replay_log (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dead_letter_id bigint NOT NULL,
            request_id text NOT NULL,
            original_message_id uuid NOT NULL,
            new_message_id uuid NOT NULL,
            forced boolean NOT NULL DEFAULT false,
            replayed_by text NOT NULL,
            replayed_at timestamptz NOT NULL DEFAULT now()
        )""")
    # At most one unforced replay per dead letter, enforced by the database, not by callers.
    op.execute(f"CREATE UNIQUE INDEX replay_once_idx ON {s}.replay_log (dead_letter_id) WHERE NOT forced")
    op.execute(f"""
        CREATE TABLE {s}.pauses (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            topic_pattern text NOT NULL,
            reason text NOT NULL DEFAULT '',
            paused_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz,
            CONSTRAINT pauses_pattern_key UNIQUE (topic_pattern)
        )""")
    op.execute(f"""
        CREATE TABLE {s}.audit_log (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            actor text NOT NULL,
            action text NOT NULL,
            arguments jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            result jsonb NOT NULL DEFAULT '{{}}'::jsonb
        )""")


def downgrade() -> None:
    s = schema()
    for table in (
        "audit_log",
        "pauses",
        "replay_log",
        "replay_requests",
        "dead_letter_archive",
        "relay_instances",
        "distributed_locks",
        "outbox",
        "relay_settings",
    ):
        op.execute(f"DROP TABLE IF EXISTS {s}.{table}")
    op.execute(f"DROP FUNCTION IF EXISTS {s}.notify_outbox_inserted()")
