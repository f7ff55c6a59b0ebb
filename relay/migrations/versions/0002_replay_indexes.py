"""Index replay_log by dead letter and by request, for replays and dead-letter lookups.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import op

from relay.migrations.context import schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    op.execute(f"CREATE INDEX IF NOT EXISTS replay_log_dead_letter_idx ON {s}.replay_log (dead_letter_id)")
    op.execute(f"CREATE INDEX IF NOT EXISTS replay_log_request_idx ON {s}.replay_log (request_id)")


def downgrade() -> None:
    s = schema()
    op.execute(f"DROP INDEX IF EXISTS {s}.replay_log_request_idx")
    op.execute(f"DROP INDEX IF EXISTS {s}.replay_log_dead_letter_idx")
