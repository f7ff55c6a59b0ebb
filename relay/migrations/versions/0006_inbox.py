"""The consumers' inbox (issue 14): one row per (consumer, message_id) a consuming service has
claimed, so that a redelivered message is processed once (clients/inbox, docs/consumers.md).

Additive: a new table only; older relays and control planes never read it. Rows are written by the
consuming services (the inbox client), and processed rows older than the retention are deleted by
`outbox-relay inbox-cleanup` or the relay leader (OUTBOX_INBOX_RETENTION).

- status: processing (claimed, or released after a failure and to be retried), processed (the
  handler's transaction committed), failed (gave up after max attempts; kept for operators).
- locked_at / locked_by: the claim of the worker processing it now (NULL when nobody holds it). A
  lock older than the stale threshold belongs to a worker presumed dead and may be taken over.
- attempts: claims so far; it also fences the processed mark (a worker marks the row only while
  attempts is still the value its own claim set).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from alembic import op

from relay.migrations.context import schema

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    op.execute(f"""
CREATE TABLE {s}.inbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer text NOT NULL CHECK (char_length(consumer) BETWEEN 1 AND 200),
    message_id text NOT NULL CHECK (char_length(message_id) BETWEEN 1 AND 200),
    status text NOT NULL DEFAULT 'processing'
        CHECK (status IN ('processing', 'processed', 'failed')),
    locked_at timestamptz,
    locked_by text,
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    topic text,
    key text,
    CONSTRAINT inbox_consumer_message_id_key UNIQUE (consumer, message_id),
    CONSTRAINT inbox_lock_complete CHECK ((locked_at IS NULL) = (locked_by IS NULL)),
    CONSTRAINT inbox_processed_at_set CHECK ((status = 'processed') = (processed_at IS NOT NULL))
)""")
    # Claim lookups go through the unique (consumer, message_id) index. Stale-lock detection (the
    # gauge, operators' queries) reads only the rows someone holds now: a small partial index.
    op.execute(
        f"CREATE INDEX inbox_locked_at_idx ON {s}.inbox (consumer, locked_at)"
        " WHERE locked_at IS NOT NULL"
    )
    # The retention clean-up deletes processed rows oldest first, in small batches.
    op.execute(
        f"CREATE INDEX inbox_processed_at_idx ON {s}.inbox (processed_at)"
        " WHERE status = 'processed'"
    )
    # Operators list what gave up (and why) per consumer.
    op.execute(
        f"CREATE INDEX inbox_failed_idx ON {s}.inbox (consumer, received_at)"
        " WHERE status = 'failed'"
    )


def downgrade() -> None:
    s = schema()
    op.execute(f"DROP TABLE IF EXISTS {s}.inbox")
