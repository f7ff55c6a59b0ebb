"""Record the verified client identity in audit_log; share the replay rate through a token bucket.

Additive (expand/contract): a nullable column with no default (no rewrite, an instant lock) and a new
table. A control plane older than this revision keeps working on the new schema: it never names the
column (its rows keep NULL: identity not recorded) and never touches the table (it paces its replays
on its own, as before).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from alembic import op

from relay.migrations.context import schema

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    # Who the control plane verified the caller to be ('cn:<subject CN>' for an mTLS client
    # certificate, else 'token:admin' or 'anonymous'), beside the self-declared operator in `actor`.
    op.execute(f"ALTER TABLE {s}.audit_log ADD COLUMN IF NOT EXISTS client_identity text")
    # One row per shared rate ('replay'): every control-plane replica takes its replay chunks' rows
    # from it in one atomic UPDATE, so parallel requests and replicas share one rate.
    op.execute(f"""CREATE TABLE {s}.rate_buckets (
        name text PRIMARY KEY,
        tokens double precision NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )""")


def downgrade() -> None:
    s = schema()
    op.execute(f"DROP TABLE IF EXISTS {s}.rate_buckets")
    op.execute(f"ALTER TABLE {s}.audit_log DROP COLUMN IF EXISTS client_identity")
