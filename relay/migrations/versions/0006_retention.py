"""Indexes for the leader's retention clean-up of audit_log, replay_log, replay_requests and
dead_letter_archive (relay/maintenance.py, OUTBOX_*_RETENTION): each batch takes the oldest rows by
time, so that it reads only the rows it deletes, and a table with nothing to expire costs one index
probe a round.

Additive: indexes only; an older relay or control plane ignores them. CREATE INDEX (not
CONCURRENTLY: migrations run in a transaction) blocks writes to each table while it builds; these
are the small control tables, not the outbox.

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

_INDEXES = (
    ("audit_log_at_idx", "audit_log", "at"),
    ("replay_log_replayed_at_idx", "replay_log", "replayed_at"),
    ("replay_requests_created_at_idx", "replay_requests", "created_at"),
    ("dead_letter_archived_at_idx", "dead_letter_archive", "archived_at"),
)


def upgrade() -> None:
    s = schema()
    for name, table, column in _INDEXES:
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {s}.{table} ({column})")


def downgrade() -> None:
    s = schema()
    for name, _, _ in reversed(_INDEXES):
        op.execute(f"DROP INDEX IF EXISTS {s}.{name}")
